//! `skiff-cni`: the CNI plugin binary (see the `skiff_cni` library).

fn main() -> std::process::ExitCode {
    skiff_cni::plugin::main_entry()
}
