//! pier-proxy (being written).
