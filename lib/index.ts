/**
 * branch-train-stitch: build a generalist LLM out of specialised experts with the Branch-Train-Stitch
 * method, on a native CPU (and CUDA) backend.
 *
 * - `ops`: the kernels (GEMM, attention, RMSNorm, RoPE, SwiGLU, embedding, cross-entropy, AdamW, the
 *   stitch mix), forward and backward, sync and async.
 * - `info()`, `setSimdLevel()`, `setThreads()`: the backend.
 * - Formats: safetensors (read, validate, write, sharded), Hugging Face Llama `config.json`,
 *   atomic file writes.
 * - Tokenizer: byte-level BPE (train, encode, decode, Hugging Face `tokenizer.json`).
 * - Models: `LlamaModel` (load/save Hugging Face directories, train, generate), presets.
 * - Training: `Trainer` (AdamW, warmup + cosine, clipping, accumulation, resumable checkpoints),
 *   `runTraining`, data (`encodeFiles`, `splitCorpus`, `PackedLoader`, `MixtureLoader`).
 * - Inference: `generate`, `generateBatch`, `streamGenerate`, `evaluateTokens`, `Sampler`.
 * - Branch-Train-Stitch: `StitchedModel` (stitch layers, training, gates, remove/add experts),
 *   layout helpers, baselines (`modelSoup`, `BtmEnsemble`), the whole pipeline (`runPipeline`).
 * - Data: corpora (`buildCorpora`, `openCorpus`), generated math (`generateMath`, `scoreExactMatch`).
 * - Typed errors: `BtsError` and its subclasses.
 */
export * as ops from './ops/index.js';
export { info, setSimdLevel, setThreads, simdLevels, type SimdLevel, type BackendInfo } from './runtime.js';
export { cudaStatus, cudaSearchPaths, getDevice, resolveDevice, setDevice, type CudaDeviceInfo, type CudaProbe, type CudaStatus, type Device } from './device.js';
export { cudaLlamaCreate, type CudaLlama, type CudaLlamaOptions, type CudaAdamwOptions } from './engine/cuda-native.js';
export { cudaStitchedCreate, type CudaStitched, type CudaStitchedOptions } from './engine/cuda-stitched.js';
export type { DeviceOption } from './ops/core.js';
export * from './errors.js';
export * from './formats/safetensors.js';
export * from './formats/hf-config.js';
export { writeFileAtomic, writeFileAtomicAsync, copyFileAtomic, type AtomicData } from './formats/atomic.js';
export {
  BpeTokenizer,
  loadTokenizerJson,
  loadTokenizerFile,
  trainBpe,
  type AddedToken,
  type EncodeOptions,
  type DecodeOptions,
  type LoadTokenizerOptions,
  type TrainBpeOptions,
} from './tokenizer/bpe.js';

// Models, training, inference
export { LlamaModel, type LoadModelOptions, type RandomInitOptions, type SaveModelOptions, type LossSum } from './model/llama.js';
export { llamaLayout, llamaParamCount, type ParamLayout, type ParamSlot } from './model/layout.js';
export { llamaPreset, presetConfigJson, PRESET_NAMES, type PresetOptions } from './model/presets.js';
export { Trainer, readLatest, type TrainerOptions, type TrainableModel, type TrainProgress, type TrainResult, type HistoryEntry, type Batch, type BatchSource } from './train/trainer.js';
export { runTraining, type RunTrainingOptions, type RunSummary } from './train/run.js';
export * from './train/schedule.js';
export * from './data/tokens.js';
export * from './data/loader.js';
export * from './infer/sampling.js';
export { generate, generateBatch, streamGenerate, streamGenerateBatch, type GenerateOptions, type GenerateResult, type GeneratedToken, type CausalDecoder, type DecoderCache } from './infer/generate.js';
export { evaluateTokens, type EvaluateOptions, type EvaluateResult, type LossModel } from './infer/evaluate.js';
export { Rng, type RngState } from './util/random.js';
export { lineChart, heatmap, barChart, writeSvg, escapeXml, type LineSeries, type LineChartOptions, type HeatmapOptions, type BarChartOptions } from './util/plot.js';
export { Progress, formatDuration, formatRate, type ProgressOptions } from './util/progress.js';

// Branch-Train-Stitch
export * from './stitch/layout.js';
export { StitchedModel, modelWeightsSha256, readManifest, type StitchOptions, type StitchManifest } from './stitch/model.js';
export { modelSoup, checkSameArchitecture } from './baselines/soup.js';
export { BtmEnsemble, type BtmMixing } from './baselines/btm.js';
export { runPipeline, SCALES, DEFAULT_MIX, type PipelineOptions, type PipelineResult, type PipelineScale } from './pipeline/bts.js';

// Data
export { buildCorpora, openCorpus, defaultCorpusDir, readDocuments, type BuildCorporaOptions } from './data/corpora/build.js';
export { splitDocuments, presetSources, PRESET_CAPS_MB, DOMAINS, SPLITS, DOC_SEPARATOR } from './data/corpora/index.js';
export type { CorpusManifest, Domain, Split, SourceSpec, Extractor, RawDocument, OpenedCorpus, BuildProgress } from './data/corpora/index.js';
export { llamaCreate, mapFile, type NativeLlama, type NativeKvCache, type NativeMappedFile, type NativeMappedWeight, type NativeWeight, type NativeLlamaConfig, type NativeLossSum } from './engine/native.js';
export * from './data/math.js';
