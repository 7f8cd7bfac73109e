//! pier-tests: the end-to-end harness (being written).
