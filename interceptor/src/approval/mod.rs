//! Just-in-time approvals of held statements and time-bound grants (issue 7).
