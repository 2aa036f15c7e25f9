//! What masking did to a result, for the audit record: which columns and detectors masked how
//! many values with which strategy. Never holds a value.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::StrategyKind;

/// What caused a value to be masked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum MaskTarget {
    /// A column rule, named by the column's origin (`schema.table.column`) or result label.
    Column(#[serde(serialize_with = "arc_str")] Arc<str>),
    /// A content detector, by name (`card`, `email`, a custom name, ...).
    Detector(#[serde(serialize_with = "arc_str")] Arc<str>),
}

fn arc_str<S: Serializer>(s: &Arc<str>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(s)
}

impl MaskTarget {
    /// `schema.table.column` (or the result column's label) for columns, `detector:<name>`
    /// for detectors: the `column` of the audit record's masked-column list.
    pub fn label(&self) -> String {
        match self {
            MaskTarget::Column(c) => c.to_string(),
            MaskTarget::Detector(d) => format!("detector:{d}"),
        }
    }
}

/// One line of a [`MaskSummary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MaskCount {
    pub target: MaskTarget,
    /// The strategy actually applied (a type-safe NULL fallback shows as `null`).
    pub strategy: StrategyKind,
    pub values: u64,
}

/// Counts of masked values, accumulated over a result (or a session) by the relay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskSummary {
    counts: BTreeMap<(MaskTarget, StrategyKind), u64>,
}

impl MaskSummary {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Total number of masked values (a detector hit inside a value counts once per hit).
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn entries(&self) -> impl Iterator<Item = MaskCount> + '_ {
        self.counts
            .iter()
            .map(|((target, strategy), values)| MaskCount {
                target: target.clone(),
                strategy: *strategy,
                values: *values,
            })
    }

    /// Count for one target and strategy (0 when absent).
    pub fn count(&self, target: &MaskTarget, strategy: StrategyKind) -> u64 {
        self.counts
            .get(&(target.clone(), strategy))
            .copied()
            .unwrap_or(0)
    }

    pub fn merge(&mut self, other: &MaskSummary) {
        for (key, n) in &other.counts {
            *self.counts.entry(key.clone()).or_insert(0) += n;
        }
    }

    pub fn clear(&mut self) {
        self.counts.clear();
    }

    pub(crate) fn record(&mut self, target: &MaskTarget, strategy: StrategyKind, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(c) = self.counts.get_mut(&(target.clone(), strategy)) {
            *c += n;
        } else {
            self.counts.insert((target.clone(), strategy), n);
        }
    }
}

impl Serialize for MaskSummary {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.entries())
    }
}
