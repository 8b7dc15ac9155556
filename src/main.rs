//! `server`: parse the command line, set up logging, dispatch. All logic lives in the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour for a terminal only: `kubectl logs`, `docker logs` and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LORASERVE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = loraserve::cli::Cli::parse();
    match loraserve::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Output piped into a reader that stopped early (`server client list | head -1`): done, as other
        // Unix tools.
        Err(e) if e.chain().any(|c| c.is::<loraserve::cli::StdoutClosed>()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A gRPC status from `server client`: show its code name and message.
            if let Some(s) = e.downcast_ref::<tonic::Status>() {
                eprintln!("error: {}: {}", loraserve::server::status::code_label(s.code()), s.message());
                return std::process::ExitCode::FAILURE;
            }
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
