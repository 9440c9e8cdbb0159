//! `joey-pool`: joey's warm VM pool (docs/pool.md).

fn main() {
    let code = joey_shim::pool::main();
    std::process::exit(code);
}
