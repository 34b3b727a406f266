/**
 * BTM ensemble (Branch-Train-Merge, Li et al. 2022): the next-token distributions of several models
 * mixed per position, either uniformly or weighted by each model's likelihood of the context so far
 * (the posterior over "which domain is this text": w_m(t) ∝ prior_m · Π_{s<t} p_m(x_{s+1} | x_{≤s})).
 *
 *   p(x_{t+1} | x_{≤t}) = Σ_m w_m(t) p_m(x_{t+1} | x_{≤t})
 *
 * Loss evaluation runs every member's full forward (logits [B*T, V] per member, so keep B*T*V
 * moderate) and mixes in log space. Generation implements CausalDecoder: one KV cache per member,
 * every member decodes every token, and the returned "logits" are log-probabilities of the mixture
 * (which the sampler treats exactly like logits). The likelihood weights are updated with every
 * token that enters a slot (prompt and generated).
 */
import { ArgumentError } from '../errors.js';
import type { LlamaModel } from '../model/llama.js';
import type { CausalDecoder, DecoderCache } from '../infer/generate.js';
import { checkSameArchitecture } from './soup.js';

/** How the ensemble weighs its members. */
export type BtmMixing = 'uniform' | 'likelihood';

function logSumExp(a: Float32Array, off: number, n: number): number {
  let m = -Infinity;
  for (let i = 0; i < n; i++) if (a[off + i] > m) m = a[off + i];
  let s = 0;
  for (let i = 0; i < n; i++) s += Math.exp(a[off + i] - m);
  return m + Math.log(s);
}

interface BtmCache extends DecoderCache {
  members: DecoderCache[];
  /** [slots, M] log weights (unnormalised: log prior + context log-likelihood). */
  logw: Float64Array;
  /** [slots, M*V] last log-probs per member, to score the next token that enters the slot. */
  last: Float32Array;
  hasLast: Uint8Array;
}

/** An ensemble of same-architecture models mixing next-token distributions (see the file comment). */
export class BtmEnsemble implements CausalDecoder {
  readonly members: LlamaModel[];
  readonly mixing: BtmMixing;
  private readonly logPrior: number[];

  constructor(members: LlamaModel[], options: { mixing?: BtmMixing; prior?: number[] } = {}) {
    if (members.length === 0) throw new ArgumentError('BtmEnsemble: give at least one model');
    members.forEach((m, i) => checkSameArchitecture(members[0].config, m.config, 'model 0', `model ${i}`));
    this.members = members;
    this.mixing = options.mixing ?? 'likelihood';
    if (this.mixing !== 'uniform' && this.mixing !== 'likelihood') throw new ArgumentError(`BtmEnsemble: mixing must be 'uniform' or 'likelihood', got '${String(this.mixing)}'`);
    const prior = options.prior ?? members.map(() => 1);
    if (prior.length !== members.length || prior.some((p) => !(p > 0))) throw new ArgumentError('BtmEnsemble: prior needs one positive weight per member');
    const s = prior.reduce((a, b) => a + b, 0);
    this.logPrior = prior.map((p) => Math.log(p / s));
  }

  get vocabSize(): number {
    return this.members[0].config.vocabSize;
  }
  get maxPositions(): number {
    return this.members[0].config.maxPositionEmbeddings;
  }
  get tokenizer() {
    return this.members[0].tokenizer;
  }
  get eosTokenIds(): readonly number[] {
    return this.members[0].config.eosTokenIds;
  }
  get bosTokenId(): number | null {
    return this.members[0].config.bosTokenId;
  }

  /** Summed next-token loss of the mixture over a batch (targets -100 ignored). */
  async loss(inputs: Int32Array, targets: Int32Array, B: number, T: number): Promise<{ lossSum: number; count: number }> {
    const V = this.vocabSize;
    const M = this.members.length;
    const logits: Float32Array[] = [];
    for (const m of this.members) logits.push(await m.logits(inputs, B, T));
    let lossSum = 0;
    let count = 0;
    const lp = new Float64Array(M);
    for (let b = 0; b < B; b++) {
      const ll = Float64Array.from(this.logPrior); // log prior + log-likelihood of the window so far
      for (let t = 0; t < T; t++) {
        const row = b * T + t;
        const y = targets[row];
        let norm = -Infinity;
        if (this.mixing === 'likelihood') {
          for (let m = 0; m < M; m++) norm = Math.max(norm, ll[m]);
          let s = 0;
          for (let m = 0; m < M; m++) s += Math.exp(ll[m] - norm);
          norm += Math.log(s);
        }
        for (let m = 0; m < M; m++) {
          const off = row * V;
          const lse = logSumExp(logits[m], off, V);
          // log p_m(y) (or of the input's successor when the target is ignored: needed for the weights)
          const next = y !== -100 ? y : t + 1 < T ? inputs[row + 1] : -1;
          lp[m] = next >= 0 ? logits[m][off + next] - lse : 0;
        }
        if (y !== -100) {
          let mx = -Infinity;
          const terms = new Float64Array(M);
          for (let m = 0; m < M; m++) {
            terms[m] = (this.mixing === 'likelihood' ? ll[m] - norm : -Math.log(M)) + lp[m];
            mx = Math.max(mx, terms[m]);
          }
          let s = 0;
          for (let m = 0; m < M; m++) s += Math.exp(terms[m] - mx);
          lossSum -= mx + Math.log(s);
          count++;
        }
        for (let m = 0; m < M; m++) ll[m] += lp[m];
      }
    }
    return { lossSum, count };
  }

  createCache(slots: number, capacity: number): BtmCache {
    const members = this.members.map((m) => m.createCache(slots, capacity));
    const M = this.members.length;
    const logw = new Float64Array(slots * M);
    for (let s = 0; s < slots; s++) for (let m = 0; m < M; m++) logw[s * M + m] = this.logPrior[m];
    const hasLast = new Uint8Array(slots);
    return {
      members,
      logw,
      last: new Float32Array(slots * M * this.vocabSize),
      hasLast,
      length: (slot) => members[0].length(slot),
      reset: (slot) => {
        for (const c of members) c.reset(slot);
        for (let m = 0; m < M; m++) logw[slot * M + m] = this.logPrior[m];
        hasLast[slot] = 0;
      },
      dispose: () => members.forEach((c) => c.dispose()),
    };
  }

  async prefill(cache: DecoderCache, slot: number, tokens: Int32Array, out: Float32Array): Promise<void> {
    const c = cache as BtmCache;
    const V = this.vocabSize;
    const M = this.members.length;
    if (this.mixing === 'likelihood') {
      // The context likelihood needs every prompt position's distribution: one full forward per member.
      for (let m = 0; m < M; m++) {
        const lg = await this.members[m].logits(tokens, 1, tokens.length);
        let ll = 0;
        if (c.hasLast[slot]) ll += c.last[(slot * M + m) * V + tokens[0]];
        for (let t = 0; t + 1 < tokens.length; t++) ll += lg[t * V + tokens[t + 1]] - logSumExp(lg, t * V, V);
        c.logw[slot * M + m] += ll;
      }
    }
    const row = new Float32Array(V);
    for (let m = 0; m < M; m++) {
      await this.members[m].prefill(c.members[m], slot, tokens, row);
      this.storeLogProbs(c, slot, m, row);
    }
    c.hasLast[slot] = 1;
    this.mix(c, slot, out, 0);
  }

  async decode(cache: DecoderCache, slots: Int32Array, tokens: Int32Array, out: Float32Array): Promise<void> {
    const c = cache as BtmCache;
    const V = this.vocabSize;
    const M = this.members.length;
    const S = slots.length;
    if (this.mixing === 'likelihood') {
      for (let r = 0; r < S; r++) {
        const s = slots[r];
        if (c.hasLast[s]) for (let m = 0; m < M; m++) c.logw[s * M + m] += c.last[(s * M + m) * V + tokens[r]];
      }
    }
    const buf = new Float32Array(S * V);
    for (let m = 0; m < M; m++) {
      await this.members[m].decode(c.members[m], slots, tokens, buf);
      for (let r = 0; r < S; r++) this.storeLogProbs(c, slots[r], m, buf.subarray(r * V, (r + 1) * V));
    }
    for (let r = 0; r < S; r++) {
      c.hasLast[slots[r]] = 1;
      this.mix(c, slots[r], out, r * V);
    }
  }

  dispose(): void {
    // Members are owned by the caller.
  }

  private storeLogProbs(c: BtmCache, slot: number, m: number, logits: Float32Array): void {
    const V = this.vocabSize;
    const M = this.members.length;
    const lse = logSumExp(logits, 0, V);
    const dst = c.last.subarray((slot * M + m) * V, (slot * M + m + 1) * V);
    for (let i = 0; i < V; i++) dst[i] = logits[i] - lse;
  }

  /** out[off..off+V) = log Σ_m w_m p_m (mixture log-probabilities). */
  private mix(c: BtmCache, slot: number, out: Float32Array, off: number): void {
    const V = this.vocabSize;
    const M = this.members.length;
    const lw = new Float64Array(M);
    let mx = -Infinity;
    for (let m = 0; m < M; m++) {
      lw[m] = this.mixing === 'likelihood' ? c.logw[slot * M + m] : -Math.log(M);
      mx = Math.max(mx, lw[m]);
    }
    let s = 0;
    for (let m = 0; m < M; m++) s += Math.exp(lw[m] - mx);
    for (let m = 0; m < M; m++) lw[m] = Math.exp(lw[m] - mx) / s;
    for (let i = 0; i < V; i++) {
      let p = 0;
      for (let m = 0; m < M; m++) p += lw[m] * Math.exp(c.last[(slot * M + m) * V + i]);
      out[off + i] = Math.log(p);
    }
  }
}
