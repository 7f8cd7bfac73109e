//! pier-dns (being written).
