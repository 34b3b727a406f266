/**
 * Typed errors of branch-train-stitch. Every error the package throws on purpose is a `BtsError` with
 * a stable `code`; subclasses exist for the failures a caller can act on. Native errors carry the same
 * codes (see native/include/bts/common.h) and are mapped here by {@link fromNative}.
 */

/** Base class: `code` is stable across versions; `message` names the argument, expected and actual value. */
export class BtsError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** A buffer has the wrong number of elements for the shape the other arguments imply. */
export class ShapeError extends BtsError {
  constructor(message: string) {
    super('E_SHAPE', message);
  }
}

/** A buffer has the wrong element type (e.g. a Float64Array where a Float32Array is needed). */
export class DTypeError extends BtsError {
  constructor(message: string) {
    super('E_DTYPE', message);
  }
}

/** An argument is out of range, missing or malformed. */
export class ArgumentError extends BtsError {
  constructor(message: string) {
    super('E_ARGUMENT', message);
  }
}

/** A token id lies outside [0, vocabSize). */
export class TokenRangeError extends BtsError {
  constructor(message: string) {
    super('E_TOKEN_RANGE', message);
  }
}

/** The requested SIMD level is not supported by this CPU. */
export class UnsupportedSimdError extends BtsError {
  constructor(message: string) {
    super('E_UNSUPPORTED_SIMD', message);
  }
}

/** No native binary could be loaded for this platform. */
export class NoBinaryFoundError extends BtsError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('E_NO_BINARY', message, options);
  }
}

/** A native allocation failed. */
export class InsufficientMemoryError extends BtsError {
  constructor(message: string) {
    super('E_OUT_OF_MEMORY', message);
  }
}

/** The operation was aborted through its AbortSignal. */
export class AbortError extends BtsError {
  constructor(message = 'The operation was aborted') {
    super('E_ABORTED', message);
  }
}

/** An object was used after dispose(). */
export class DisposedError extends BtsError {
  constructor(what: string) {
    super('E_DISPOSED', `${what} has been disposed`);
  }
}

const byCode: Record<string, new (message: string) => BtsError> = {
  E_SHAPE: ShapeError,
  E_DTYPE: DTypeError,
  E_ARGUMENT: ArgumentError,
  E_TOKEN_RANGE: TokenRangeError,
  E_UNSUPPORTED_SIMD: UnsupportedSimdError,
  E_OUT_OF_MEMORY: InsufficientMemoryError,
};

/** Maps an Error thrown by the native addon (with a `code` property) to the typed class. */
export function fromNative(e: unknown): unknown {
  if (e instanceof BtsError) return e;
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && code.startsWith('E_')) {
      const Cls = byCode[code];
      return Cls ? new Cls(e.message) : new BtsError(code, e.message);
    }
  }
  return e;
}

/** A file (safetensors, config.json, tokenizer.json, ...) is malformed; the message names the file and the fault. */
export class FormatError extends BtsError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('E_FORMAT', message, options);
  }
}

/** A file is well formed but uses a feature this package does not implement (e.g. a Unigram tokenizer, attention_bias). */
export class UnsupportedFeatureError extends BtsError {
  constructor(message: string) {
    super('E_UNSUPPORTED', message);
  }
}

// Registered here rather than in the literal above: the classes are declared after it (TDZ).
byCode.E_FORMAT = FormatError;
byCode.E_UNSUPPORTED = UnsupportedFeatureError;
// Native E_DISPOSED messages name the object ("NativeLlama.decode: the model"): DisposedError adds "has been disposed".
byCode.E_DISPOSED = DisposedError;

/**
 * An external program the operation needs (npm, apt-get, dpkg-deb, man, ...) is not installed; the
 * message names the program and the package that provides it.
 */
export class MissingToolError extends BtsError {
  /** The missing program, e.g. `dpkg-deb`. */
  readonly tool: string;
  constructor(tool: string, message: string) {
    super('E_MISSING_TOOL', message);
    this.tool = tool;
  }
}

/**
 * A device was asked for that cannot be used: `device: 'cuda'` where no usable CUDA GPU, driver or
 * CUDA build of the addon is present. The message says which (see `cudaStatus()`); `device: 'auto'`
 * falls back to the CPU instead of throwing.
 */
export class DeviceUnavailableError extends BtsError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('E_DEVICE', message, options);
  }
}

/** A CUDA runtime call or kernel failed; the message names the call, its source file and line, and the CUDA error. */
export class CudaError extends BtsError {
  constructor(message: string) {
    super('E_CUDA', message);
  }
}

byCode.E_DEVICE = DeviceUnavailableError;
byCode.E_CUDA = CudaError;
