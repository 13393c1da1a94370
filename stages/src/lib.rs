//! Stage kinds; see ARCHITECTURE.md.

pub mod grade;
pub mod report;
