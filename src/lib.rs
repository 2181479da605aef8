//! Kiln facade library.
