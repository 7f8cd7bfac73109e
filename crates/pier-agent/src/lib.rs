//! pier-agent (being written).
