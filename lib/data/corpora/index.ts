/**
 * Domain corpora for Branch-Train-Stitch (issue 5): the public face of lib/data/corpora/. Build with
 * {@link buildCorpora} (or `bts data`), read with {@link openCorpus}. docs/DATA.md describes the
 * sources, licences, cleaning and splits.
 */
export { buildCorpora, openCorpus, defaultCorpusDir, readDocuments, splitDocuments, assignSplit, waterFill, hashUnit } from './build.js';
export type { BuildCorporaOptions, OpenedCorpus, OpenCorpusOptions } from './build.js';
export { presetSources, PRESET_CAPS_MB } from './presets.js';
export type { PresetName } from './presets.js';
export { EXTRACTORS, htmlToText, chunkText, codePart } from './extract.js';
export { normalizeText, dedupByHash, dedupLines, minifiedOrGeneratedReason, looksEnglish, isForeignLine, filterLanguage, cleanEmailBody } from './clean.js';
export { DOMAINS, SPLITS, DOC_SEPARATOR } from './types.js';
export type {
  Domain,
  Split,
  RawDocument,
  ExtractContext,
  Extractor,
  SourceKind,
  SourceSpec,
  CorpusFileInfo,
  CorpusPart,
  CorpusSourceRecord,
  CorpusDomain,
  CorpusManifest,
  BuildProgress,
} from './types.js';
