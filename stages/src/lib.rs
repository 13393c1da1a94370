//! Stage kinds; see ARCHITECTURE.md.

pub mod records;
pub mod readers;
pub mod download;
pub mod templates;
pub mod tokenize;
