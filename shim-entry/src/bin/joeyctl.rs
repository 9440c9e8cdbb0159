//! `joeyctl`: joey's developer/operator CLI.

fn main() {
    let code = joey_shim::ctl::main();
    std::process::exit(code);
}
