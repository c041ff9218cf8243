//! keygate-load as a library: the request it sends (`shape`), shared with keygate's
//! criterion benchmarks so that a micro-benchmark decides the very request a load run
//! sends. The generator itself is the `keygate-load` binary.

pub mod shape;
