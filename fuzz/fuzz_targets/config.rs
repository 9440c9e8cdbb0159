// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The config parser: TOML text (the part of the input before the first NUL) parsed and
//! validated; the rest, as `key=value` lines, applied as `io.joey.config.*` annotations.
#![no_main]

use joey_config::{Config, ANNOTATION_PREFIX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (text, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(cfg) = Config::from_toml_str(text, "<fuzz>") else {
        return;
    };
    // A config that parsed dumps and parses back to itself.
    let again = Config::from_toml_str(&cfg.to_toml_string(), "<dump>").expect("dump parses");
    assert_eq!(again, cfg);
    let rest = String::from_utf8_lossy(rest);
    let annotations: Vec<(String, String)> = rest
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), v.to_string()))
        .collect();
    if let Ok(c) = cfg.with_annotations(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        let _ = c.validate("<fuzz>");
    }
});
