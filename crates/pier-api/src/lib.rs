//! pier-api (being written).
