//! Benches live in `benches/`; scripts for peer comparisons beside them.
