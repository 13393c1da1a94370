//! Stage kinds: the plumbing between manifests and the library modules of this crate.
//!
//! Each module holds one kind implementing [`pipeline_engine::Stage`]; they are registered in
//! [`crate::registry`].

pub(crate) mod datautil;
pub mod download;
pub mod filter;
pub mod read;
pub mod tokenize;
