/**
 * Generation and evaluation on the native engine: KV-cached greedy decoding equals argmax over
 * full-forward logits recomputed from scratch; several prompts decoded together equal one at a time;
 * sampling is reproducible for a seed; stop tokens / stop strings / max tokens / abort; the stream
 * (iterator and callback) carries exactly the final text, multi-byte characters included;
 * perplexity matches a direct computation; the BTM ensemble matches a brute-force mixture.
 */
import { describe, expect, it } from 'vitest';
import { parseLlamaConfig } from '../../lib/formats/hf-config.js';
import { LlamaModel } from '../../lib/model/llama.js';
import { generate, generateBatch, streamGenerate } from '../../lib/infer/generate.js';
import { evaluateTokens } from '../../lib/infer/evaluate.js';
import { BtmEnsemble } from '../../lib/baselines/btm.js';
import { trainBpe } from '../../lib/tokenizer/bpe.js';
import { AbortError, TokenRangeError } from '../../lib/errors.js';

const text = 'Grüße aus Köln! 東京は大きい。 The quick brown fox jumps over the lazy dog. 1 + 2 = 3. '.repeat(20);
const tokenizer = await trainBpe([text], { vocabSize: 300, specialTokens: ['<s>', '</s>'], bosToken: '<s>', eosToken: '</s>' });
const V = tokenizer.vocabSize;
const config = parseLlamaConfig({ model_type: 'llama', vocab_size: V, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 96, bos_token_id: tokenizer.bosId, eos_token_id: tokenizer.eosId });

function argmaxRow(a: Float32Array, off: number, n: number): number {
  let b = 0;
  for (let i = 1; i < n; i++) if (a[off + i] > a[off + b]) b = i;
  return b;
}

/** Greedy continuation by full forwards over the whole sequence (no cache). */
async function referenceGreedy(model: LlamaModel, prompt: Int32Array, n: number): Promise<number[]> {
  const seq = Array.from(prompt);
  const out: number[] = [];
  for (let s = 0; s < n; s++) {
    const lg = await model.logits(Int32Array.from(seq), 1, seq.length);
    const next = argmaxRow(lg, (seq.length - 1) * V, V);
    out.push(next);
    seq.push(next);
  }
  return out;
}

describe('generate', () => {
  const model = LlamaModel.random(config, { seed: 11, initStd: 0.2, tokenizer });

  it('greedy KV-cached decoding equals argmax of full forwards', async () => {
    const prompt = Int32Array.from([5, 17, 200, 3]);
    const r = await generate(model, prompt, { temperature: 0, maxNewTokens: 20, stopTokens: [] });
    expect(r.tokens).toEqual(await referenceGreedy(model, prompt, 20));
    expect(r.finishReason).toBe('length');
  });

  it('decodes several prompts together exactly as one at a time', async () => {
    const prompts = [[1, 2, 3], [40, 41], [7, 8, 9, 10, 11, 12], [250]];
    const together = await generateBatch(model, prompts, { temperature: 0.9, topK: 20, seed: 3, maxNewTokens: 12, stopTokens: [] });
    for (let i = 0; i < prompts.length; i++) {
      const alone = await generateBatch(model, [prompts[i]], { temperature: 0.9, topK: 20, seed: 3 + i * 7919, maxNewTokens: 12, stopTokens: [] });
      expect(together[i].tokens).toEqual(alone[0].tokens);
    }
  });

  it('is reproducible for a seed and varies across seeds', async () => {
    const a = await generate(model, [1, 2], { temperature: 1.5, seed: 1, maxNewTokens: 16, stopTokens: [] });
    const b = await generate(model, [1, 2], { temperature: 1.5, seed: 1, maxNewTokens: 16, stopTokens: [] });
    const c = await generate(model, [1, 2], { temperature: 1.5, seed: 2, maxNewTokens: 16, stopTokens: [] });
    expect(a.tokens).toEqual(b.tokens);
    expect(a.tokens).not.toEqual(c.tokens);
  });

  it('stops at a stop token and at a stop string', async () => {
    const prompt = Int32Array.from([9, 9, 9]);
    const ref = await referenceGreedy(model, prompt, 10);
    const stopAt = ref[4];
    const r = await generate(model, prompt, { temperature: 0, maxNewTokens: 10, stopTokens: [stopAt] });
    expect(r.finishReason).toBe('stop');
    expect(r.tokens).toEqual(ref.slice(0, ref.indexOf(stopAt)));
    const full = await generate(model, prompt, { temperature: 0, maxNewTokens: 10, stopTokens: [] });
    const cut = full.text.slice(3, 5);
    if (cut.length === 2) {
      const s = await generate(model, prompt, { temperature: 0, maxNewTokens: 10, stopTokens: [], stopStrings: [cut] });
      expect(s.finishReason).toBe('stop');
      expect(s.text).toBe(full.text.slice(0, full.text.indexOf(cut)));
    }
  });

  it('streams exactly the final text (iterator and callback), multi-byte characters whole', async () => {
    const pieces: string[] = [];
    const cb: string[] = [];
    const it = streamGenerate(model, 'Grüße 東京', { temperature: 1, seed: 5, maxNewTokens: 30, stopTokens: [], onToken: (t) => cb.push(t.text) });
    let r = await it.next();
    while (!r.done) {
      pieces.push(r.value.text);
      r = await it.next();
    }
    expect(pieces.join('')).toBe(r.value.text.slice(0, pieces.join('').length));
    expect(cb.join('')).toBe(pieces.join(''));
    expect(r.value.text).toBe(tokenizer.decode(r.value.tokens));
    expect(pieces.join('').includes('\uFFFD') && !r.value.text.includes('\uFFFD')).toBe(false);
  });

  it('aborts and validates prompts', async () => {
    const ac = new AbortController();
    const p = generate(model, [1], { maxNewTokens: 50, stopTokens: [], signal: ac.signal, onToken: (t) => t && ac.abort() });
    await expect(p).rejects.toThrow(AbortError);
    await expect(generate(model, [V + 5], {})).rejects.toThrow(TokenRangeError);
    await expect(generate(model, [], {})).rejects.toThrow(/empty/);
  });

  it('perplexity equals the mean loss of the logits', async () => {
    const toks = tokenizer.encode(text.slice(0, 400));
    const r = await evaluateTokens(model, toks, { seqLen: 16, batchSize: 3 });
    // Direct: windows of 16 starting at 0, 16, 32, ...
    let sum = 0;
    let n = 0;
    for (let w = 0; w + 1 < toks.length; w += 16) {
      const len = Math.min(16, toks.length - 1 - w);
      const lg = await model.logits(toks.slice(w, w + len), 1, len);
      for (let t = 0; t < len; t++) {
        let mx = -Infinity;
        for (let i = 0; i < V; i++) mx = Math.max(mx, lg[t * V + i]);
        let s = 0;
        for (let i = 0; i < V; i++) s += Math.exp(lg[t * V + i] - mx);
        sum += mx + Math.log(s) - lg[t * V + toks[w + t + 1]];
        n++;
      }
    }
    expect(r.tokens).toBe(n);
    expect(r.loss).toBeCloseTo(sum / n, 4);
    expect(r.perplexity).toBeCloseTo(Math.exp(sum / n), 3);
  });
});

describe('BTM ensemble', () => {
  const a = LlamaModel.random(config, { seed: 1, initStd: 0.3, tokenizer });
  const b = LlamaModel.random(config, { seed: 2, initStd: 0.3, tokenizer });

  async function logProbs(m: LlamaModel, toks: Int32Array): Promise<number[][]> {
    const lg = await m.logits(toks, 1, toks.length);
    return Array.from({ length: toks.length }, (_, t) => {
      let mx = -Infinity;
      for (let i = 0; i < V; i++) mx = Math.max(mx, lg[t * V + i]);
      let s = 0;
      for (let i = 0; i < V; i++) s += Math.exp(lg[t * V + i] - mx);
      return Array.from({ length: V }, (_, i) => lg[t * V + i] - mx - Math.log(s));
    });
  }

  for (const mixing of ['uniform', 'likelihood'] as const) {
    it(`${mixing} mixing: loss equals a brute-force mixture`, async () => {
      const toks = Int32Array.from({ length: 13 }, (_, i) => (i * 37) % V);
      const inputs = toks.slice(0, 12);
      const targets = toks.slice(1, 13);
      const ens = new BtmEnsemble([a, b], { mixing });
      const r = await ens.loss(inputs, targets, 1, 12);
      const la = await logProbs(a, inputs);
      const lb = await logProbs(b, inputs);
      let ll = [Math.log(0.5), Math.log(0.5)];
      let expected = 0;
      for (let t = 0; t < 12; t++) {
        const y = targets[t];
        const w = mixing === 'uniform' ? [0.5, 0.5] : ll.map((x) => Math.exp(x)).map((x, _, arr) => x / (arr[0] + arr[1]));
        expected -= Math.log(w[0] * Math.exp(la[t][y]) + w[1] * Math.exp(lb[t][y]));
        ll = [ll[0] + la[t][y], ll[1] + lb[t][y]];
      }
      expect(r.count).toBe(12);
      expect(r.lossSum).toBeCloseTo(expected, 3);
    });
  }

  it('decodes with one cache per member: greedy follows the mixture argmax', async () => {
    const ens = new BtmEnsemble([a, b], { mixing: 'likelihood' });
    const prompt = [3, 4, 5];
    const r = await generate(ens, prompt, { temperature: 0, maxNewTokens: 6, stopTokens: [] });
    // Recompute each step's mixture from full forwards.
    const seq = [...prompt];
    for (const tok of r.tokens) {
      const la = await logProbs(a, Int32Array.from(seq));
      const lb = await logProbs(b, Int32Array.from(seq));
      let l0 = 0;
      let l1 = 0;
      for (let t = 0; t + 1 < seq.length; t++) {
        l0 += la[t][seq[t + 1]];
        l1 += lb[t][seq[t + 1]];
      }
      const w0 = 1 / (1 + Math.exp(l1 - l0));
      const last = seq.length - 1;
      let best = 0;
      let bestP = -1;
      for (let i = 0; i < V; i++) {
        const p = w0 * Math.exp(la[last][i]) + (1 - w0) * Math.exp(lb[last][i]);
        if (p > bestP) {
          bestP = p;
          best = i;
        }
      }
      expect(tok).toBe(best);
      seq.push(tok);
    }
  });
});
