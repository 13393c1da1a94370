//! Stage kinds; see ARCHITECTURE.md.
