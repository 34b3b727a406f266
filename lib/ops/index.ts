/**
 * `ops`: the native kernels, public. Each op has a sync form (`rmsnormForward`) and an async form
 * (`rmsnormForwardAsync`, run on the compute pool off the event loop, returning a Promise). Inputs are
 * Float32Array (fp32), Uint16Array (bf16 bit patterns) and Int32Array (ids); outputs are allocated
 * when not given. Wrong lengths, shapes or dtypes throw ShapeError / DTypeError / ArgumentError naming
 * the argument. Conventions (row-major, [out, in] weights, dW accumulated, dX overwritten):
 * docs/ARCHITECTURE.md.
 */
export * from './rmsnorm.js';
export * from './embedding.js';
export * from './adamw.js';
export * from './gemm.js';
export * from './attention.js';
export * from './rope.js';
export * from './swiglu.js';
export * from './stitch.js';
export * from './cross_entropy.js';
