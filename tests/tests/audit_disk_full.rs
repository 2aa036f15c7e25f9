//! A full audit disk: statements are refused with a clear ErrorResponse (never a bare EOF), and
//! nothing runs on PostgreSQL without its record.

use std::path::Path;
use std::process::Command;

use interceptor_tests::pg::APP_RW;
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster, PgCommand,
};

/// A small tmpfs, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(dir))
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn fill(&self) {
        // dd stops at ENOSPC; that is the point.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.path().join("filler").display()))
            .output();
    }
    fn free(&self) {
        let _ = std::fs::remove_file(self.path().join("filler"));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_audit_disk_refuses_statements_with_an_error_response() {
    let Some(fs) = SmallFs::mount("16m") else {
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    };
    let pg = PgCluster::start().unwrap();
    let audit = fs.path().join("audit");
    let setup = InterceptorSetup::new(&pg)
        .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RW))
        .allow_all_policies()
        .audit_dir(&audit);
    let proxy = Interceptor::start(setup).unwrap();
    let psql = |sql: &str| {
        PgCommand::psql(&proxy.params(ALICE))
            .args(["-c", sql])
            .run()
            .unwrap()
    };
    assert!(psql("SELECT 1").success());
    fs.fill();
    // Enough statements that some commit meets ENOSPC.
    let mut sql = String::new();
    for i in 0..20 {
        sql.push_str(&format!("SELECT '{i}{}';", "x".repeat(1000)));
    }
    let out = psql(&sql);
    assert!(!out.success());
    assert!(
        out.stderr.contains("audit trail cannot be written"),
        "the client must get interceptor's ErrorResponse, not EOF: {out:?}"
    );
    // An ErrorResponse with interceptor's own message and SQLSTATE class 58 reached psql
    // (psql adds its "server closed the connection" line after any FATAL).
    assert!(out.stderr.contains("FATAL:  interceptor:"), "{out:?}");
    assert!(
        proxy
            .logs()
            .contains("audit commit failed; refusing further appends"),
        "no log line says the trail is unwritable"
    );
    assert!(
        proxy.logs().contains("No space left on device"),
        "the log line does not say why"
    );
    fs.free();
}
