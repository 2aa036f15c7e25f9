//! What the kernel step's interceptor is configured with: the `[ebpf]` section and the policy
//! that routes the demo identity by its kernel-attested process.

use std::path::Path;

use anyhow::{Context, Result};
use interceptor_tests::pg::APP_DB;

use super::{POLICY_NAME, ROUTED_ROLE};
use crate::demo::masking;

/// The policy that routes the demo identity by its process: psql run by `uid`.
pub fn policy_toml(uid: u32) -> String {
    format!(
        "[policy]\n\
         name = \"{POLICY_NAME}\"\n\
         description = \"cargo xtask demo: the demo identity from a psql process of uid {uid}, \
         as the kernel attests it\"\n\
         \n\
         [identities]\n\
         subjects = [\"{agent}\"]\n\
         [identities.process]\n\
         uids = [{uid}]\n\
         exes = [\"*/bin/psql\"]\n\
         \n\
         [login]\n\
         upstream_role = \"{ROUTED_ROLE}\"\n\
         databases = [\"{APP_DB}\"]\n\
         \n\
         [[rule]]\n\
         name = \"read-only\"\n\
         decision = \"allow\"\n\
         kinds = [\"read\"]\n\
         functions = [\"pg_catalog.*\"]\n",
        agent = masking::AGENT,
    )
}

/// `[ebpf]`: steer `port` (PostgreSQL's) into interceptor, pins under `pin_dir`.
pub fn ebpf_toml(port: u16, pin_dir: &Path) -> Result<String> {
    use toml::{Table, Value};
    let mut ebpf = Table::new();
    ebpf.insert("enabled".into(), Value::Boolean(true));
    ebpf.insert(
        "ports".into(),
        Value::Array(vec![Value::Integer(i64::from(port))]),
    );
    ebpf.insert(
        "pin_dir".into(),
        Value::String(pin_dir.to_string_lossy().into_owned()),
    );
    let mut root = Table::new();
    root.insert("ebpf".into(), Value::Table(ebpf));
    toml::to_string(&root).context("serialize [ebpf]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebpf_section_names_the_port_and_pin_dir() {
        let text = ebpf_toml(54321, Path::new("/sys/fs/bpf/interceptor-demo-1")).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["ebpf"]["enabled"].as_bool(), Some(true));
        assert_eq!(v["ebpf"]["ports"][0].as_integer(), Some(54321));
        assert_eq!(
            v["ebpf"]["pin_dir"].as_str(),
            Some("/sys/fs/bpf/interceptor-demo-1")
        );
    }

    #[test]
    fn policy_requires_the_attested_process() {
        let v: toml::Value = toml::from_str(&policy_toml(1000)).unwrap();
        assert_eq!(
            v["identities"]["process"]["uids"][0].as_integer(),
            Some(1000)
        );
        assert_eq!(
            v["identities"]["process"]["exes"][0].as_str(),
            Some("*/bin/psql")
        );
        assert_eq!(v["login"]["upstream_role"].as_str(), Some(ROUTED_ROLE));
    }
}
