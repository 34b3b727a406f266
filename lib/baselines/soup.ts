/**
 * Model soup (Wortsman et al. 2022), the simplest baseline BTS must beat: the element-wise (weighted)
 * mean of the weights of models branched from one seed. All members must share the architecture
 * (checked field by field, the first mismatch named). The result is an ordinary trainable Llama
 * model with the first member's tokenizer.
 */
import { ArgumentError, ShapeError } from '../errors.js';
import type { LlamaConfig } from '../formats/hf-config.js';
import { ENGINE_CONFIG_FIELDS, configDifference } from '../engine/native.js';
import { LlamaModel } from '../model/llama.js';
import { llamaLayout } from '../model/layout.js';

/** The fields compared: those the engine reads, except the context length (averaging ignores it). */
const ARCH_FIELDS = ENGINE_CONFIG_FIELDS.filter((f) => f !== 'maxPositionEmbeddings');

/** Throws ShapeError naming the first architecture field where `b` differs from `a` (values as JSON). */
export function checkSameArchitecture(a: LlamaConfig, b: LlamaConfig, nameA = 'model 0', nameB = 'model 1'): void {
  const d = configDifference(a, b, ARCH_FIELDS);
  if (d) throw new ShapeError(`${nameB} differs from ${nameA} in ${d.field}: ${d.b} vs ${d.a}`);
}

/**
 * The weighted element-wise mean of the members' weights (uniform by default).
 * @param weights one non-negative weight per model (normalised here).
 */
export function modelSoup(models: LlamaModel[], weights?: number[]): LlamaModel {
  if (models.length === 0) throw new ArgumentError('modelSoup: give at least one model');
  const w = weights ?? models.map(() => 1);
  if (w.length !== models.length) throw new ArgumentError(`modelSoup: ${w.length} weights for ${models.length} models`);
  if (w.some((x) => !(x >= 0) || !Number.isFinite(x))) throw new ArgumentError('modelSoup: weights must be finite and >= 0');
  const total = w.reduce((a, b) => a + b, 0);
  if (!(total > 0)) throw new ArgumentError('modelSoup: the weights sum to 0');
  models.forEach((m, i) => checkSameArchitecture(models[0].config, m.config, 'model 0', `model ${i}`));
  const layout = llamaLayout(models[0].config);
  const params = new Float32Array(layout.size);
  for (let i = 0; i < models.length; i++) {
    const c = w[i] / total;
    if (c === 0) continue;
    for (const s of layout.slots) {
      const src = models[i].tensorF32(s.name);
      const dst = params.subarray(s.offset, s.offset + s.length);
      for (let k = 0; k < dst.length; k++) dst[k] += c * src[k];
    }
  }
  return LlamaModel.fromParams(models[0].config, params, models[0].tokenizer);
}
