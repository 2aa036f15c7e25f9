//! Policy files, statement classification and decisions (issue 4).
