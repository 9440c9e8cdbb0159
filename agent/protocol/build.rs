use std::fs;
use std::path::Path;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

/// The generated files start with inner attributes (`#![allow(..)]`) and inner doc comments
/// (`//! ..`), which are not allowed in a file pulled in with `include!`. Strip them; lib.rs puts
/// equivalent outer attributes on the modules instead.
fn strip_inner_attributes(path: &Path) {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading generated {}: {e}", path.display()));
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("#![") || t.starts_with("//!"))
        })
        .collect();
    fs::write(path, kept.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("writing generated {}: {e}", path.display()));
}

fn main() {
    let out = std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo");
    println!("cargo:rerun-if-changed=protos/agent.proto");
    println!("cargo:rerun-if-changed=build.rs");
    Codegen::new()
        .out_dir(&out)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc codegen of protos/agent.proto failed");
    for f in ["agent.rs", "agent_ttrpc.rs"] {
        strip_inner_attributes(&Path::new(&out).join(f));
    }
}
