//! The SQL lexer and classifier, with both `standard_conforming_strings` settings.
#![no_main]

use interceptor::policy::{classify, lexer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    for scs in [true, false] {
        let lex = lexer::LexSettings {
            standard_conforming_strings: scs,
        };
        let _ = lexer::split_statements(sql, lex);
        let _ = lexer::tokenize(sql, lex);
        let _ = classify::classify(sql, lex);
    }
});
