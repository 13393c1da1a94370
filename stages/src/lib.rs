//! Stage kinds; see ARCHITECTURE.md.

pub mod download;
pub mod readers;
pub mod records;
pub mod templates;
pub mod tokenize;
