//! pier-supervisor (being written).
