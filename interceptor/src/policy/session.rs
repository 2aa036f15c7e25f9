//! SQL-level prepared statements of one client session: `EXECUTE name` is decided by what
//! `name` was prepared as, so the proxy feeds every statement it forwarded into this map.

use std::collections::HashMap;

use interceptor_sql::classify::Classified;

/// Per-session map from prepared-statement name to its classification.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionStatements {
    prepared: HashMap<String, Classified>,
}

impl SessionStatements {
    pub(crate) fn new() -> SessionStatements {
        SessionStatements::default()
    }

    /// Records the effect of statements that were sent upstream and succeeded: PREPARE adds a
    /// name, DEALLOCATE removes it, DEALLOCATE ALL / DISCARD ALL clear the map.
    pub(crate) fn observe(&mut self, statements: &[Classified]) {
        for s in statements {
            self.apply(s);
        }
    }

    pub(crate) fn apply(&mut self, s: &Classified) {
        if let Some(name) = &s.prepares {
            let mut inner = s.clone();
            inner.prepares = None;
            self.prepared.insert(name.clone(), inner);
        }
        match s.deallocates.as_deref() {
            Some("") => self.prepared.clear(),
            Some(name) => {
                self.prepared.remove(name);
            }
            None => {}
        }
    }

    /// What `name` was prepared as.
    pub(crate) fn get(&self, name: &str) -> Option<&Classified> {
        self.prepared.get(name)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.prepared.is_empty()
    }
}
