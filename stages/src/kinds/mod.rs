//! Stage kinds: one module per kind, plumbing only (parameters, artifact layout, calls into
//! the library modules of this crate and into `pipeline-models`).

pub mod python_stdlib;
