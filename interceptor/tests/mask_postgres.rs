#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly
//! The masking engine against real PostgreSQL 15 messages: a throwaway cluster produces the
//! RowDescription/DataRow (text and binary), ErrorResponse, COPY (text, CSV, binary) and
//! NotificationResponse bytes; masked COPY data is loaded back into PostgreSQL to prove it is
//! still type-correct.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use interceptor::mask::{
    ColumnOrigin, CopyColumn, CopyOptions, MaskRules, MaskSummary, MaskTarget, OriginCache,
    StrategyKind, catalog_query, table_oids,
};

const BIN: &str = "/usr/lib/postgresql/15/bin";
const PORT: u16 = 5432;

struct Cluster {
    dir: tempfile::TempDir,
    server: Child,
}

fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", &format!("{BIN}/{program}")]);
    c
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(status.success());
        let data = dir.path().join("data");
        let out = as_postgres("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = as_postgres("postgres")
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-p",
                &PORT.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        let cluster = Cluster { dir, server };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster.socket().exists() {
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
        cluster
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join(format!(".s.PGSQL.{PORT}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate"])
            .output();
        let _ = self.server.wait();
    }
}

/// A minimal frontend speaking the v3 protocol, returning raw message bodies.
struct Conn {
    s: UnixStream,
}

type Msg = (u8, Vec<u8>);

impl Conn {
    fn connect(path: &Path) -> Conn {
        let mut s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut body = 196608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0postgres\0database\0postgres\0\0");
        let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        s.write_all(&startup).expect("startup");
        let mut c = Conn { s };
        c.until_ready();
        c
    }

    fn read(&mut self) -> Msg {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head).expect("header");
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.s.read_exact(&mut body).expect("body");
        (head[0], body)
    }

    fn send(&mut self, tag: u8, body: &[u8]) {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        self.s.write_all(&m).expect("send");
    }

    fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.read();
            if m.0 == b'Z' {
                return out;
            }
            out.push(m);
        }
    }

    fn query(&mut self, sql: &str) -> Vec<Msg> {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        self.send(b'Q', &b);
        self.until_ready()
    }

    /// Parse/Bind (all results in `format`)/Describe portal/Execute/Sync.
    fn extended(&mut self, sql: &str, format: i16) -> Vec<Msg> {
        let mut parse = b"\0".to_vec();
        parse.extend_from_slice(sql.as_bytes());
        parse.extend_from_slice(&[0, 0, 0]);
        self.send(b'P', &parse);
        let mut bind = b"\0\0".to_vec();
        bind.extend_from_slice(&0i16.to_be_bytes());
        bind.extend_from_slice(&0i16.to_be_bytes());
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&format.to_be_bytes());
        self.send(b'B', &bind);
        self.send(b'D', b"P\0");
        self.send(b'E', b"\0\0\0\0\0");
        self.send(b'S', b"");
        self.until_ready()
    }

    /// COPY ... FROM STDIN with `data`; returns the server's messages.
    fn copy_in(&mut self, sql: &str, data: &[u8]) -> Vec<Msg> {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        self.send(b'Q', &b);
        let (tag, _) = self.read();
        assert_eq!(tag, b'G', "CopyInResponse expected");
        self.send(b'd', data);
        self.send(b'c', b"");
        self.until_ready()
    }
}

fn one(msgs: &[Msg], tag: u8) -> Vec<u8> {
    let found: Vec<&Msg> = msgs.iter().filter(|m| m.0 == tag).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one '{}' in {:?}",
        tag as char,
        tags(msgs)
    );
    found[0].1.clone()
}

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.0 as char).collect()
}

/// Values of a DataRow body (test-side decoding).
fn values(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut pos = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]);
        pos += 4;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(body[pos..pos + len as usize].to_vec()));
            pos += len as usize;
        }
    }
    assert_eq!(pos, body.len());
    out
}

fn s(v: &Option<Vec<u8>>) -> String {
    String::from_utf8(v.clone().expect("not null")).expect("utf8")
}

const RAW: [&str; 5] = [
    "4111 1111 1111 1111",
    "alice@example.com",
    "7946 0958",
    "123-45-6789",
    "4111111111111111",
];

fn assert_no_raw(bytes: &[u8], what: &str) {
    let text = String::from_utf8_lossy(bytes);
    for raw in RAW {
        assert!(!text.contains(raw), "{what} leaked {raw}: {text}");
    }
}

fn rules() -> MaskRules {
    let section: toml::Value = toml::from_str(
        r#"
exempt_groups = ["dba"]
[[column]]
match = "public.accounts.card_number"
strategy = "partial"
keep_last = 4
[[column]]
name_pattern = "(?i)^email$"
strategy = "pseudonym"
[[detector]]
all = true
strategy = "redact"
"#,
    )
    .expect("toml");
    MaskRules::from_toml(&[section], Some(b"a test key of 32 bytes, not real")).expect("rules")
}

/// Resolve the origins of a RowDescription with the catalog query, as the relay would.
fn resolve(conn: &mut Conn, rd: &[u8], cache: &mut OriginCache) {
    let oids = cache.missing(&table_oids(rd).expect("oids"));
    if oids.is_empty() {
        return;
    }
    let msgs = conn.query(&catalog_query(&oids));
    for oid in &oids {
        cache.insert_table(*oid);
    }
    for (tag, body) in msgs {
        if tag != b'D' {
            continue;
        }
        let v = values(&body);
        cache.insert(
            s(&v[0]).parse().expect("oid"),
            s(&v[1]).parse().expect("attnum"),
            ColumnOrigin::new(s(&v[2]), s(&v[3]), s(&v[4])),
        );
    }
}

#[test]
fn masking_real_postgres_messages() {
    assert!(
        Path::new(BIN).join("postgres").exists(),
        "PostgreSQL 15 is required"
    );
    let cluster = Cluster::start();
    let mut conn = Conn::connect(&cluster.socket());
    let setup = conn.query(
        "CREATE TABLE accounts (id int PRIMARY KEY, card_number text, email text UNIQUE, \
         notes text, balance bigint, doc jsonb);
         INSERT INTO accounts VALUES (1, '4111 1111 1111 1111', 'alice@example.com', \
         'call +44 20 7946 0958', 4111111111111111, '{\"ssn\": \"123-45-6789\", \"n\": 1}');
         CREATE TABLE copy_back (LIKE accounts);",
    );
    assert!(!setup.iter().any(|m| m.0 == b'E'), "setup failed");
    let rules = rules();
    let mut cache = OriginCache::default();
    let mut summary = MaskSummary::new();
    let select = "SELECT id, card_number AS cn, email, notes, balance, doc, \
                  row_to_json(a) AS j, lower(email) AS le FROM accounts a";

    // Simple query, text format.
    let msgs = conn.query(select);
    let rd = one(&msgs, b'T');
    resolve(&mut conn, &rd, &mut cache);
    let plan = rules
        .plan(&rd, &|t, a| cache_origin(&cache, t, a))
        .expect("plan")
        .expect("rules apply");
    let row = one(&msgs, b'D');
    let masked = plan
        .mask_data_row(&row, &mut summary)
        .expect("mask")
        .expect("changed");
    assert_no_raw(&masked, "text DataRow");
    let v = values(&masked);
    assert_eq!(s(&v[0]), "1");
    assert_eq!(s(&v[1]), "**** **** **** 1111");
    assert!(s(&v[2]).starts_with("p_"));
    assert_eq!(s(&v[3]), "call [REDACTED:phone]");
    assert_eq!(v[4], None, "a card in a bigint becomes NULL");
    let doc: serde_json::Value = serde_json::from_str(&s(&v[5])).expect("jsonb text is JSON");
    assert_eq!(doc["ssn"], "[REDACTED:ssn]");
    let j: serde_json::Value = serde_json::from_str(&s(&v[6])).expect("row_to_json is JSON");
    assert_eq!(j["email"], "[REDACTED:email]");
    assert_eq!(j["balance"], "[REDACTED:card]");
    assert_eq!(s(&v[7]), "[REDACTED:email]");
    assert_eq!(
        summary.count(
            &MaskTarget::Column("public.accounts.card_number".into()),
            StrategyKind::Partial
        ),
        1
    );

    // Extended protocol, binary results.
    let msgs = conn.extended(select, 1);
    let rd = one(&msgs, b'T');
    let plan = rules
        .plan(&rd, &|t, a| cache_origin(&cache, t, a))
        .expect("plan")
        .expect("rules apply");
    let masked = plan
        .mask_data_row(&one(&msgs, b'D'), &mut summary)
        .expect("mask")
        .expect("changed");
    assert_no_raw(&masked, "binary DataRow");
    let v = values(&masked);
    assert_eq!(v[0].as_deref(), Some(&1i32.to_be_bytes()[..]));
    assert_eq!(s(&v[1]), "**** **** **** 1111");
    assert_eq!(v[4], None);
    let doc = v[5].clone().expect("jsonb");
    assert_eq!(doc[0], 1, "jsonb version byte");
    let doc: serde_json::Value = serde_json::from_slice(&doc[1..]).expect("jsonb JSON");
    assert_eq!(doc["ssn"], "[REDACTED:ssn]");

    // The dba group is exempt: the same row passes untouched.
    let dba = rules
        .for_identity(&interceptor::identity::Identity {
            subject: "root".into(),
            display_name: "root".into(),
            groups: vec!["dba".into()],
            proof: interceptor::identity::Proof::ScramSha256,
            process: None,
        })
        .expect("dba rules");
    assert!(
        dba.plan(&rd, &|t, a| cache_origin(&cache, t, a))
            .expect("plan")
            .is_none()
    );

    // A unique violation echoes the key; a cast error echoes its input.
    let msgs = conn.query("INSERT INTO accounts (id, email) VALUES (2, 'alice@example.com')");
    let err = one(&msgs, b'E');
    assert!(String::from_utf8_lossy(&err).contains("Key (email)=(alice@example.com)"));
    let masked = rules
        .mask_error_fields(&err, &mut summary)
        .expect("mask")
        .expect("changed");
    assert_no_raw(&masked, "unique violation");
    assert!(String::from_utf8_lossy(&masked).contains("Key (email)=([REDACTED]) already exists."));
    let msgs = conn.query("SELECT card_number::int FROM accounts");
    let masked = rules
        .mask_error_fields(&one(&msgs, b'E'), &mut summary)
        .expect("mask")
        .expect("changed");
    assert_no_raw(&masked, "cast error");

    // COPY in three formats; the masked data must load back into PostgreSQL.
    let described = conn.query("SELECT * FROM accounts");
    let rd = one(&described, b'T');
    let columns = CopyColumn::from_row_description(&rd, &|t, a| cache_origin(&cache, t, a))
        .expect("copy columns");
    assert_eq!(columns.len(), 6);
    assert_eq!(
        columns[1].origin,
        Some(ColumnOrigin::new("public", "accounts", "card_number"))
    );
    for (options, with) in [
        (CopyOptions::text(), ""),
        (CopyOptions::csv(), " WITH (FORMAT csv)"),
        (CopyOptions::binary(), " WITH (FORMAT binary)"),
    ] {
        let msgs = conn.query(&format!("COPY accounts TO STDOUT{with}"));
        let mut masker = rules
            .copy_plan(&one(&msgs, b'H'), Some(&columns), options)
            .expect("copy plan")
            .expect("rules apply");
        let mut out = Vec::new();
        for (tag, body) in &msgs {
            if *tag == b'd' {
                // Split every CopyData in two to exercise row reassembly.
                let (a, b) = body.split_at(body.len() / 2);
                for part in [a, b] {
                    match masker.feed(part, &mut summary).expect("feed") {
                        Some(m) => out.extend_from_slice(&m),
                        None => out.extend_from_slice(part),
                    }
                }
            }
        }
        if let Some(rest) = masker.finish(&mut summary).expect("finish") {
            out.extend_from_slice(&rest);
        }
        assert_no_raw(&out, with);
        let loaded = conn.copy_in(&format!("COPY copy_back FROM STDIN{with}"), &out);
        assert!(
            !loaded.iter().any(|m| m.0 == b'E'),
            "PostgreSQL rejected masked COPY{with}: {:?}",
            loaded
                .iter()
                .map(|m| String::from_utf8_lossy(&m.1).into_owned())
                .collect::<Vec<_>>()
        );
        assert!(String::from_utf8_lossy(&one(&loaded, b'C')).starts_with("COPY 1"));
    }
    let back = conn.query("SELECT card_number, balance IS NULL FROM copy_back");
    let rows: Vec<Vec<Option<Vec<u8>>>> = back
        .iter()
        .filter(|m| m.0 == b'D')
        .map(|m| values(&m.1))
        .collect();
    assert_eq!(rows.len(), 3);
    for r in rows {
        assert_eq!(s(&r[0]), "**** **** **** 1111");
        assert_eq!(s(&r[1]), "t");
    }

    // NOTIFY payloads.
    conn.query("LISTEN events");
    let msgs = conn.query("NOTIFY events, 'signup alice@example.com'");
    let masked = rules
        .mask_notification_body(&one(&msgs, b'A'), &mut summary)
        .expect("mask")
        .expect("changed");
    assert_no_raw(&masked, "notification");
    assert!(String::from_utf8_lossy(&masked).contains("signup [REDACTED:email]"));

    let audit = serde_json::to_string(&summary).expect("summary json");
    assert_no_raw(audit.as_bytes(), "summary");
}

fn cache_origin(cache: &OriginCache, t: u32, a: i16) -> Option<ColumnOrigin> {
    use interceptor::mask::CatalogResolver;
    cache.origin(t, a)
}
