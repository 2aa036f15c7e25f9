//! The audit trail: durable, hash-chained, sled-backed records (issue 3).
