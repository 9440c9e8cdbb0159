//! containerd shim v2 for joey: `ctr run --runtime io.containerd.joey.v2 ...` (docs/shim.md).

fn main() {
    std::process::exit(joey_shim::shim::main());
}
