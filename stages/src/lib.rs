//! Stage kinds; see ARCHITECTURE.md.

pub mod evalsets;
