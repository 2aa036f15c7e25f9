//! Embeds the eBPF object of `interceptor-ebpf` so that the interceptor binary is one file.
//!
//! The object is taken from `$INTERCEPTOR_EBPF_OBJ` or, when that is unset, from where
//! `cargo xtask build-ebpf` puts it: `<target>/ebpf/bpfel-unknown-none/{release,debug}/interceptor-ebpf`.
//! Without it the build still succeeds; the binary then reports at runtime that eBPF support was
//! not compiled in.

use std::path::{Path, PathBuf};

const ENV: &str = "INTERCEPTOR_EBPF_OBJ";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(interceptor_ebpf_embedded)");
    println!("cargo::rerun-if-env-changed={ENV}");
    println!("cargo::rerun-if-changed=build.rs");

    let Some(out_dir) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        println!("cargo::warning=OUT_DIR unset: eBPF object not embedded");
        return;
    };
    let embedded = out_dir.join("interceptor-ebpf.o");

    let found = match std::env::var_os(ENV) {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                println!(
                    "cargo::warning={ENV}={} is not a file: interceptor is built without eBPF \
                     support",
                    p.display()
                );
                return;
            }
            Some(p)
        }
        _ => default_object(&out_dir),
    };

    match found {
        Some(obj) => {
            // Watch only an existing file: a missing path would rerun this script on every build.
            println!("cargo::rerun-if-changed={}", obj.display());
            if let Err(e) = std::fs::copy(&obj, &embedded) {
                println!(
                    "cargo::warning=cannot copy {}: {e}: eBPF support not compiled in",
                    obj.display()
                );
                return;
            }
            println!("cargo::rustc-cfg=interceptor_ebpf_embedded");
        }
        None => {
            println!(
                "cargo::warning=eBPF object not found (run `cargo xtask build-ebpf` first or set \
                 {ENV}): interceptor is built without eBPF support"
            );
        }
    }
}

/// `<target>/ebpf/bpfel-unknown-none/<profile>/interceptor-ebpf`, `<target>` being the directory
/// above `<profile>/build/<pkg>-<hash>/out`.
fn default_object(out_dir: &Path) -> Option<PathBuf> {
    let target = out_dir.ancestors().nth(4)?;
    ["release", "debug"]
        .iter()
        .map(|profile| {
            target
                .join("ebpf")
                .join("bpfel-unknown-none")
                .join(profile)
                .join("interceptor-ebpf")
        })
        .find(|p| p.is_file())
}
