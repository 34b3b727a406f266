/**
 * A stitched model (hub + n experts + K stitch layers, docs/FORMAT.md) composed from OUR public ops,
 * as a test-side oracle: stitch.test.ts compares it with the PyTorch goldens of make_stitch_golden.py,
 * and the native stitched engine is to be checked against it. Clarity before speed: one op call per
 * step, expert states kept as separate [N, D] buffers and stacked model-major [n, N, D] only where
 * the stitch ops want them.
 *
 * It follows the method's cost rule (../shared/METHOD.md, "What training needs") so that the engine
 * can be compared with it step by step:
 * - blocks up to the first stitch run forward-only and keep no activations;
 * - frozen blocks after it do input gradients only (blockBackward with no gradient map: no dW GEMM,
 *   no norm-weight reduction); the frozen final norm and LM head likewise (crossEntropy and
 *   rmsnormBackward without dweight);
 * - an expert's stream carries a gradient only between the first stitch that writes it with its own
 *   parameters (an H->E stitch, or an E->H one with the projected stream) and the last E->H stitch
 *   that mixes it into the hub: expert blocks after the last stitch are not run at all, and expert
 *   blocks outside that range keep no activations and run no backward (with "all E->H, unchanged"
 *   the experts never run a backward); an H->E stitch with no E->H after it gets zero gradients
 *   without any work;
 * - the first stitch computes weight gradients but no input gradients (nothing below needs them).
 * The only weight gradients are those of the stitch tensors.
 *
 * Ops: gate logits G = h0 W_gate^T and projections with `gemm` NT; the hub bias added to G (E->H slot
 * 0 +b, H->E expert slots -b); `stitchEHForward` / `stitchHEForward` for the gated mixes;
 * backward with `stitchEHBackward` / `stitchHEBackward`, then GEMM TN for dW (+=) and NN for dx.
 *
 * Legend: B batch, T sequence, N = B*T rows, D hidden, V vocab, L blocks, n experts, M = n + 1 models
 * (model 0 the hub, model e+1 expert e), K stitches. Known limits: fp32 only, positions 0..T-1 (no KV
 * cache), no gate dropout (training randomness is not part of the oracle).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ArgumentError, FormatError, openSafetensors, ops } from '../../lib/index.js';
import { checkStitchPlacement, stitchGateName, stitchProjName, stitchTensorNames, type StitchSpec } from '../../lib/stitch/layout.js';
import { blockBackward, blockContext, blockForward, embed, loadModel, type BlockContext, type LayerSaved, type LlamaModel } from './llama-ops.js';

/** What an expert's stream becomes after an E->H stitch: its projection p_e (default) or unchanged h_e. */
export type ExpertStream = 'projected' | 'unchanged';

/** stitch.json, as docs/FORMAT.md defines it (version 1). */
export interface StitchManifest {
  format: 'bts-stitch';
  version: 1;
  hub: { path: string; sha256: string };
  experts: { name: string; path: string; sha256: string }[];
  stitches: StitchSpec[];
  expertStream: ExpertStream;
  hubBias: number;
  gateDropout: number;
  init: string;
  dModel: number;
  numExperts: number;
}

/** The oracle's model: frozen hub and experts, stitch placement and options, stitch tensors by name. */
export interface StitchedModel {
  hub: LlamaModel;
  experts: LlamaModel[];
  stitches: StitchSpec[];
  expertStream: ExpertStream;
  /** Fixed logit offset favouring the hub (0 = none). */
  hubBias: number;
  /** Every stitch tensor by name (`stitch.{k}.proj.{e}.weight` [D, D], `stitch.{k}.gate.weight` [D*M, D]); tests may edit them. */
  tensors: Map<string, Float32Array>;
}

const HEX64 = /^[0-9a-f]{64}$/;

/** Validates a parsed stitch.json (every field of FORMAT.md version 1); `file` names it in errors. */
export function parseManifest(json: unknown, file: string): StitchManifest {
  const bad = (what: string, got: unknown): never => {
    throw new FormatError(`${file}: ${what}, got ${JSON.stringify(got)}`);
  };
  if (typeof json !== 'object' || json === null || Array.isArray(json)) bad('expected a JSON object', json);
  const m = json as Record<string, unknown>;
  if (m.format !== 'bts-stitch') bad(`'format' must be "bts-stitch"`, m.format);
  if (m.version !== 1) bad(`'version' must be 1`, m.version);
  const model = (v: unknown, where: string, named: boolean) => {
    const o = v as Record<string, unknown>;
    if (typeof o !== 'object' || o === null) bad(`'${where}' must be an object`, v);
    if (typeof o.path !== 'string' || o.path === '') bad(`'${where}.path' must be a non-empty string`, o.path);
    if (typeof o.sha256 !== 'string' || !HEX64.test(o.sha256)) bad(`'${where}.sha256' must be 64 lowercase hex digits`, o.sha256);
    if (named && (typeof o.name !== 'string' || o.name === '')) bad(`'${where}.name' must be a non-empty string`, o.name);
  };
  model(m.hub, 'hub', false);
  if (!Array.isArray(m.experts) || m.experts.length === 0) bad(`'experts' must be a non-empty array`, m.experts);
  (m.experts as unknown[]).forEach((e, i) => model(e, `experts[${i}]`, true));
  if (m.numExperts !== (m.experts as unknown[]).length) bad(`'numExperts' must equal the number of experts (${(m.experts as unknown[]).length})`, m.numExperts);
  if (!Number.isInteger(m.dModel) || (m.dModel as number) < 1) bad(`'dModel' must be an integer >= 1`, m.dModel);
  if (m.expertStream !== 'projected' && m.expertStream !== 'unchanged') bad(`'expertStream' must be "projected" or "unchanged"`, m.expertStream);
  if (typeof m.hubBias !== 'number' || !Number.isFinite(m.hubBias)) bad(`'hubBias' must be a finite number`, m.hubBias);
  if (typeof m.gateDropout !== 'number' || !(m.gateDropout >= 0 && m.gateDropout < 1)) bad(`'gateDropout' must be a number in [0, 1)`, m.gateDropout);
  if (typeof m.init !== 'string') bad(`'init' must be a string`, m.init);
  if (!Array.isArray(m.stitches)) bad(`'stitches' must be an array`, m.stitches);
  return m as unknown as StitchManifest;
}

/**
 * The manifest hash of a checkpoint directory (docs/FORMAT.md): SHA-256, lowercase hex, of the bytes
 * of its safetensors weight files concatenated in file-name order (the files named by
 * model.safetensors.index.json's weight_map when it exists, else model.safetensors).
 */
export function weightsSha256(dir: string): string {
  const index = path.join(dir, 'model.safetensors.index.json');
  let files = ['model.safetensors'];
  if (fs.existsSync(index)) {
    const map = (JSON.parse(fs.readFileSync(index, 'utf8')) as { weight_map: Record<string, string> }).weight_map;
    files = [...new Set(Object.values(map))].sort((a, b) => Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8')));
  }
  const h = createHash('sha256');
  for (const f of files) h.update(fs.readFileSync(path.join(dir, f)));
  return h.digest('hex');
}

/**
 * Loads `dir`/stitch.json, the hub and expert checkpoints it names (paths relative to `dir`) and
 * `dir`/stitches.safetensors, checking the placement, that all models share the hub's config, and
 * every stitch tensor's presence and shape. Hashes are NOT checked here (the test does, separately).
 */
export function loadStitched(dir: string): { model: StitchedModel; manifest: StitchManifest } {
  const file = path.join(dir, 'stitch.json');
  const manifest = parseManifest(JSON.parse(fs.readFileSync(file, 'utf8')), file);
  const hub = loadModel(path.resolve(dir, manifest.hub.path));
  const experts = manifest.experts.map((e) => loadModel(path.resolve(dir, e.path)));
  const c = hub.config;
  checkStitchPlacement(manifest.stitches, c.numHiddenLayers, file);
  if (manifest.dModel !== c.hiddenSize) throw new FormatError(`${file}: 'dModel' ${manifest.dModel} != the hub's hidden_size ${c.hiddenSize}`);
  experts.forEach((e, i) => {
    for (const key of Object.keys(c) as (keyof typeof c)[]) {
      if (JSON.stringify(e.config[key]) !== JSON.stringify(c[key]))
        throw new FormatError(`${file}: expert ${i} (${manifest.experts[i].path}) has ${key} ${JSON.stringify(e.config[key])}, the hub ${JSON.stringify(c[key])}`);
    }
  });
  const tensors = new Map<string, Float32Array>();
  const stFile = path.join(dir, 'stitches.safetensors');
  using st = openSafetensors(stFile);
  for (const { name, shape } of stitchTensorNames(c.hiddenSize, experts.length, manifest.stitches)) {
    const info = st.tensors.get(name);
    if (!info) throw new FormatError(`${stFile}: missing tensor ${name}`);
    if (info.shape.join(',') !== shape.join(',')) throw new FormatError(`${stFile}: ${name} has shape [${info.shape}], expected [${shape}]`);
    tensors.set(name, Float32Array.from(st.getF32(name)));
  }
  const model: StitchedModel = { hub, experts, stitches: manifest.stitches, expertStream: manifest.expertStream, hubBias: manifest.hubBias, tensors };
  return { model, manifest };
}

// ---------------------------------------------------------------------------------------------------
// GEMM layouts (as in llama-ops.ts).

/** y [rows, out] = x [rows, in] W^T, W [out, in] (NT); into `c` when given. */
function linear(x: Float32Array, w: Float32Array, rows: number, inF: number, outF: number, c?: Float32Array): Float32Array {
  return ops.gemm({ a: x, b: w, c, m: rows, n: outF, k: inF, transB: true });
}

/** dx [rows, in] (+= with beta 1) dy [rows, out] W [out, in] (NN). */
function linearDx(dy: Float32Array, w: Float32Array, rows: number, inF: number, outF: number, dx?: Float32Array, beta = 0): Float32Array {
  return ops.gemm({ a: dy, b: w, c: dx, m: rows, n: inF, k: outF, beta });
}

/** dW [out, in] += dy^T [out, rows] x [rows, in] (TN, accumulated). */
function linearDw(dy: Float32Array, x: Float32Array, dw: Float32Array, rows: number, inF: number, outF: number): void {
  ops.gemm({ a: dy, b: x, c: dw, m: outF, n: inF, k: rows, transA: true, beta: 1 });
}

/** [n, N, D] model-major stack of n [N, D] buffers. */
function stack(parts: Float32Array[]): Float32Array {
  const ND = parts[0].length;
  const out = new Float32Array(parts.length * ND);
  parts.forEach((p, e) => out.set(p, e * ND));
  return out;
}

/** The n [N, D] slices (views) of a [n, N, D] stack. */
function slices(a: Float32Array, n: number): Float32Array[] {
  const ND = a.length / n;
  return Array.from({ length: n }, (_, e) => a.subarray(e * ND, (e + 1) * ND));
}

// ---------------------------------------------------------------------------------------------------
// Forward and backward.

/** What the forward keeps per stitch for the backward. */
interface StitchSaved {
  h0: Float32Array; //    [N, D] hub state entering the stitch
  h: Float32Array; //     [n, N, D] expert states entering the stitch
  mixed: Float32Array; // [n, N, D] p_e = h_e W_proj_e^T (E->H) or q_e = h0 W_proj_e^T (H->E)
  G: Float32Array; //     [N, D*M] gate logits, hub bias included
}

export interface StitchedStepOptions {
  /** Run the backward (stitch gradients). Default true; false = forward and loss only, nothing saved. */
  backward?: boolean;
}

export interface StitchedStepResult {
  /** Mean cross-entropy of the hub's next-token predictions over the counted targets. */
  loss: number;
  /** Targets counted (not -100). */
  count: number;
  /** [B, T, V] hub logits (a separate GEMM: the loss never materialises them). */
  logits: Float32Array;
  /** Gradient of the mean loss for every stitch tensor, by name (empty without the backward). */
  grads: Map<string, Float32Array>;
  /** What ran (the cost rule, for tests): block evaluations by mode, summed over the n+1 models. */
  blocks: { forwardOnly: number; saved: number; backward: number };
}

/**
 * One stitched training step (forward, hub loss, backward to the stitch tensors only) on ids [B, T]
 * with next-token targets [B, T] (-100 ignored), positions 0..T-1.
 */
export function stitchedStep(model: StitchedModel, ids: Int32Array, targets: Int32Array, B: number, T: number, opts: StitchedStepOptions = {}): StitchedStepResult {
  const backward = opts.backward ?? true;
  const { hub, experts, stitches, expertStream, hubBias, tensors } = model;
  const c = hub.config;
  const { vocabSize: V, hiddenSize: D, numHiddenLayers: L, rmsNormEps: eps } = c;
  const n = experts.length;
  const M = n + 1;
  if (ids.length !== B * T || targets.length !== B * T) throw new ArgumentError(`stitchedStep: ids (${ids.length}) and targets (${targets.length}) must both have B*T = ${B * T} elements`);
  checkStitchPlacement(stitches, L, 'stitchedStep');
  const ctx: BlockContext = blockContext(c, B, T);
  const N = ctx.N;
  const first = stitches[0].afterBlock;
  const last = stitches[stitches.length - 1].afterBlock;
  // Expert streams reach the loss only through E->H stitches: after the last one they are dead.
  const lastEH = Math.max(0, ...stitches.filter((s) => s.type === 'eh').map((s) => s.afterBlock));
  // A gradient on an expert stream is of use only where a stitch below WRITES that stream with its
  // own parameters (H->E; E->H with the projected stream): none in "all E->H, unchanged".
  const firstWriter = Math.min(Infinity, ...stitches.filter((s) => s.type === 'he' || expertStream === 'projected').map((s) => s.afterBlock));
  const stitchAt = new Map(stitches.map((s, k) => [s.afterBlock, k]));
  const t = (name: string): Float32Array => {
    const a = tensors.get(name);
    if (!a) throw new ArgumentError(`stitchedStep: missing stitch tensor ${name}`);
    return a;
  };
  const blocks = { forwardOnly: 0, saved: 0, backward: 0 };

  // ---- forward
  let h0 = embed(hub, ids); //                         [N, D] hub stream
  let hs = experts.map((e) => embed(e, ids)); //       n x [N, D] expert streams
  const hubSaved: (LayerSaved | null)[] = [];
  const expSaved: (LayerSaved | null)[][] = experts.map(() => []);
  const stitchSaved: StitchSaved[] = [];
  for (let j = 1; j <= L; j++) {
    const save = backward && j > first; // blocks up to the first stitch: forward only, nothing kept
    const r = blockForward(hub, j - 1, h0, ctx, save);
    h0 = r.y;
    hubSaved[j - 1] = r.saved;
    blocks[save ? 'saved' : 'forwardOnly']++;
    if (j <= last) {
      // expert blocks after the last stitch are not run; their backward is needed between the
      // first stitch writing the expert streams and the last E->H stitch reading them
      const saveE = backward && j > firstWriter && j <= lastEH;
      hs = hs.map((x, e) => {
        const re = blockForward(experts[e], j - 1, x, ctx, saveE);
        expSaved[e][j - 1] = re.saved;
        blocks[saveE ? 'saved' : 'forwardOnly']++;
        return re.y;
      });
    }
    const k = stitchAt.get(j);
    if (k === undefined) continue;
    const wGate = t(stitchGateName(k)); //                            [D*M, D]
    const G = linear(h0, wGate, N, D, D * M); //                      [N, D*M]: G[t, d*M + m]
    if (hubBias !== 0) {
      for (let r0 = 0; r0 < N * D * M; r0 += M) {
        if (stitches[k].type === 'eh') G[r0] += hubBias; //          hub logit of (t, d)
        else for (let m = 1; m < M; m++) G[r0 + m] -= hubBias; //   expert logits of (t, d)
      }
    }
    const h0In = h0; //                                                 [N, D] hub state entering the stitch
    const h = stack(hs); //                                            [n, N, D]
    const mixed = new Float32Array(n * N * D); //                      [n, N, D]
    const mixedParts = slices(mixed, n);
    if (stitches[k].type === 'eh') {
      hs.forEach((x, e) => linear(x, t(stitchProjName(k, e)), N, D, D, mixedParts[e])); // p_e = h_e W_e^T
      h0 = ops.stitchEHForward({ h0: h0In, p: mixed, gate: G, experts: n }).out; //        [N, D]
      if (expertStream === 'projected') hs = mixedParts;
    } else {
      for (let e = 0; e < n; e++) linear(h0In, t(stitchProjName(k, e)), N, D, D, mixedParts[e]); // q_e = h0 W_e^T
      hs = slices(ops.stitchHEForward({ h, q: mixed, gate: G, experts: n }).out, n); //             h0 unchanged
    }
    if (backward) stitchSaved[k] = { h0: h0In, h, mixed, G };
  }
  const { out: xf, rstd: rstdF } = ops.rmsnormForward({ x: h0, weight: hub.norm, eps }); // [N, D] hub's final norm
  const logits = linear(xf, hub.lmHead, N, D, V); //                   [N, V], for comparison only

  // ---- loss (fused LM head, frozen: no dweight)
  let count = 0;
  for (const tg of targets) if (tg !== -100) count++;
  const ce = ops.crossEntropy({ x: xf, weight: hub.lmHead, targets, backward, dweight: null, gradScale: 1 / count });
  if (ce.count !== count) throw new Error(`crossEntropy counted ${ce.count} targets, expected ${count}`);
  const grads = new Map<string, Float32Array>();
  if (!backward) return { loss: ce.loss, count, logits, grads, blocks };
  for (const { name, shape } of stitchTensorNames(D, n, stitches)) grads.set(name, new Float32Array(shape[0] * shape[1]));

  // ---- backward, walking down from the loss: dh0 [N, D] the hub stream's gradient; dhs n x [N, D]
  // the experts', null until an E->H stitch has mixed them into the hub, and again below the first
  // stitch that writes them.
  let dh0 = ops.rmsnormBackward({ x: h0, weight: hub.norm, rstd: rstdF, dout: ce.dx!, dweight: null }).dx;
  let dhs: Float32Array[] | null = null;
  for (let j = L; j >= first; j--) {
    const k = stitchAt.get(j);
    if (k !== undefined) ({ dh0, dhs } = stitchBackward(model, k, stitchSaved[k], dh0, dhs, { hub: k > 0, experts: firstWriter < j }, N, grads));
    if (j === first) break; // nothing below the first stitch needs a gradient
    dh0 = blockBackward(hub, j - 1, hubSaved[j - 1]!, dh0, ctx, null); // frozen: input gradient only
    blocks.backward++;
    if (dhs) {
      dhs = dhs.map((d, e) => blockBackward(experts[e], j - 1, expSaved[e][j - 1]!, d, ctx, null));
      blocks.backward += n;
    }
  }
  return { loss: ce.loss, count, logits, grads, blocks };
}

/**
 * Backward of stitch k: given the gradients of its outputs (hub dh0 [N, D]; experts dhs n x [N, D],
 * or null where no loss path leaves the experts), accumulates the gradients of its tensors into
 * `grads` and returns those of its inputs that `need` asks for: the hub's (every stitch below reads
 * h0: all but the first stitch) and the experts' (only above a stitch that writes expert streams).
 */
function stitchBackward(
  model: StitchedModel,
  k: number,
  s: StitchSaved,
  dh0: Float32Array,
  dhs: Float32Array[] | null,
  need: { hub: boolean; experts: boolean },
  N: number,
  grads: Map<string, Float32Array>,
): { dh0: Float32Array; dhs: Float32Array[] | null } {
  const n = model.experts.length;
  const D = model.hub.config.hiddenSize;
  const M = n + 1;
  const wGate = model.tensors.get(stitchGateName(k))!; //   [D*M, D]
  const wProj = Array.from({ length: n }, (_, e) => model.tensors.get(stitchProjName(k, e))!); // n x [D, D]
  const gGate = grads.get(stitchGateName(k))!;
  const gProj = Array.from({ length: n }, (_, e) => grads.get(stitchProjName(k, e))!);
  const hIn = slices(s.h, n);

  if (model.stitches[k].type === 'eh') {
    // h0' = g_0 h0 + sum_e g_e p_e, g = softmax_m(G); p_e = h_e W_e^T; h_e' = p_e or h_e
    const r = ops.stitchEHBackward({ h0: s.h0, p: s.mixed, gate: s.G, dout: dh0, experts: n }); // dh0 = g_0 dout, dp = g_e dout, dgate
    const dp = slices(r.dp, n); //                                    n x [N, D]
    if (dhs && model.expertStream === 'projected') dp.forEach((d, e) => addInto(d, dhs![e])); // h_e' = p_e also feeds the expert
    linearDw(r.dgate, s.h0, gGate, N, D, D * M); //                   dW_gate += dG^T h0
    dp.forEach((d, e) => linearDw(d, hIn[e], gProj[e], N, D, D)); //   dW_e += dp_e^T h_e
    if (need.hub) linearDx(r.dgate, wGate, N, D, D * M, r.dh0, 1); //  dh0 += dG W_gate
    const dIn = !need.experts
      ? null
      : dp.map((d, e) => {
          const dx = linearDx(d, wProj[e], N, D, D); //                dh_e = dp_e W_e
          if (dhs && model.expertStream === 'unchanged') addInto(dx, dhs[e]); // h_e' = h_e
          return dx;
        });
    return { dh0: r.dh0, dhs: dIn };
  }

  // H->E: h0' = h0; h_e' = (1 - g_e) h_e + g_e q_e, g_e = sigmoid(G[.., e+1]), q_e = h0 W_e^T
  if (!dhs) return { dh0, dhs: null }; // no E->H after it: the experts' outputs reach no loss
  const r = ops.stitchHEBackward({ h: s.h, q: s.mixed, gate: s.G, dout: stack(dhs), experts: n }); // dh, dq, dgate (slot 0 zero)
  const dq = slices(r.dq, n);
  linearDw(r.dgate, s.h0, gGate, N, D, D * M); //                     dW_gate += dG^T h0 (rows m = 0 get 0)
  dq.forEach((d, e) => linearDw(d, s.h0, gProj[e], N, D, D)); //      dW_e += dq_e^T h0
  let dh0In = dh0; //                                                  identity path
  if (need.hub) {
    dh0In = Float32Array.from(dh0);
    linearDx(r.dgate, wGate, N, D, D * M, dh0In, 1); //               += dG W_gate
    dq.forEach((d, e) => linearDx(d, wProj[e], N, D, D, dh0In, 1)); // += dq_e W_e
  }
  return { dh0: dh0In, dhs: need.experts ? slices(r.dh, n) : null };
}

function addInto(a: Float32Array, b: Float32Array): void {
  for (let i = 0; i < a.length; i++) a[i] += b[i];
}

/** Forward-only loss of the stitched model (for finite differences). */
export function stitchedLoss(model: StitchedModel, ids: Int32Array, targets: Int32Array, B: number, T: number): number {
  return stitchedStep(model, ids, targets, B, T, { backward: false }).loss;
}
