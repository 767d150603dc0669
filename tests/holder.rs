//! The fd holder as the daemon uses it: the real binary started by `Holder::start`, in a
//! session of its own, keeping a listening socket open while no client is connected, and
//! gone once told to quit; and `hold --socket`, the holder that runs beside the daemon.
//! Needs neither root nor FUSE.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use modelpack_snapshotter::restart::holder::Holder;

const BIN: &str = env!("CARGO_BIN_EXE_modelpack-snapshotter");

/// How long a holder told to quit may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Kills the holder at drop, so that a failed test leaves no process behind.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // A holder that exited was reaped: its pid may be another process's by now.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        if !cmdline.windows(b"--socket".len()).any(|w| w == b"--socket") {
            return;
        }
        if let Ok(pid) = i32::try_from(self.0) {
            // SAFETY: kill has no memory preconditions; the pid is a holder's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn start(socket: &Path) -> (Holder, KillOnDrop) {
    let holder = Holder::start(socket, Path::new(BIN)).unwrap();
    let guard = KillOnDrop(holder.pid());
    (holder, guard)
}

/// Fields of /proc/PID/stat after the command's name: state, ppid, pgrp, session, ...
fn stat_fields(pid: &str) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, after_name) = stat.rsplit_once(')').unwrap();
    after_name.split_whitespace().map(String::from).collect()
}

/// The session id, field 6 of /proc/PID/stat.
fn session(pid: &str) -> String {
    stat_fields(pid)[3].clone()
}

/// The process group id, field 5 of /proc/PID/stat.
fn process_group(pid: &str) -> String {
    stat_fields(pid)[2].clone()
}

fn wait_gone(pid: u32) {
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(started.elapsed() < EXIT_TIMEOUT, "the holder {pid} is still there after {EXIT_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_held_listening_socket_keeps_its_connections_until_taken_back() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("holder.sock");
    let (holder, _guard) = start(&socket);
    let pid = holder.pid();

    let own = pid.to_string();
    assert_ne!(session(&own), session("self"), "the holder shares the test's session");
    assert_eq!(session(&own), own, "the holder leads a session of its own");
    assert_eq!(process_group(&own), own, "the holder leads a process group of its own");

    let app = dir.path().join("app.sock");
    let listener = UnixListener::bind(&app).unwrap();
    holder.put("app", listener.as_fd()).unwrap();
    // Once answered, the holder has set up its signals.
    // SAFETY: kill has no memory preconditions; the pid is the holder's.
    assert_eq!(unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGHUP) }, 0);
    drop(holder);
    drop(listener);

    // Held: the connection waits in the backlog instead of being refused.
    let mut client = UnixStream::connect(&app).unwrap();
    client.write_all(b"hello").unwrap();

    let restarted = Holder::connect(&socket).unwrap().expect("the holder survived SIGHUP and its client");
    assert_eq!(restarted.pid(), pid, "connecting finds the holder's own process id");
    let taken = restarted.take().unwrap();
    assert_eq!(taken.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), ["app"]);
    let (_, fd) = taken.into_iter().next().unwrap();
    let (mut accepted, _) = UnixListener::from(fd).accept().unwrap();
    let mut got = [0u8; 5];
    accepted.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    restarted.quit().unwrap();
    wait_gone(pid);
    assert!(!socket.exists(), "the holder left its socket file");
    assert!(Holder::connect(&socket).unwrap().is_none());
}

#[test]
fn connect_or_start_starts_one_holder_and_then_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("holder.sock");
    // What a killed holder leaves: a socket file nobody listens at.
    drop(UnixListener::bind(&socket).unwrap());

    let first = Holder::connect_or_start(&socket, Path::new(BIN)).unwrap();
    let guard = KillOnDrop(first.pid());
    let null = std::fs::File::open("/dev/null").unwrap();
    first.put("null", null.as_fd()).unwrap();
    drop(first);

    let second = Holder::connect_or_start(&socket, Path::new(BIN)).unwrap();
    assert_eq!(second.pid(), guard.0, "a second holder was started");
    assert_eq!(second.take().unwrap().len(), 1);
    second.quit().unwrap();
    wait_gone(guard.0);
}

#[test]
fn a_killed_holder_is_gone_for_its_client() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("holder.sock");
    let (holder, guard) = start(&socket);
    drop(guard);
    wait_gone(holder.pid());
    let error = holder.take().unwrap_err();
    assert_eq!(error.to_string(), format!("the fd holder at {} is gone", socket.display()));
    assert!(Holder::connect(&socket).unwrap().is_none(), "the socket file of a killed holder is stale");
}

/// `hold --socket PATH`, the holder a container of its own runs beside the daemon's:
/// it binds the path itself, the daemon's `connect_or_start` finds it instead of starting
/// one, and a second one waits while the first answers, then takes its place.
#[test]
fn a_holder_binding_its_own_socket_is_found_and_a_second_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("holder.sock");
    let run = || std::process::Command::new(BIN).arg("hold").arg("--socket").arg(&socket).spawn().unwrap();
    let wait_listening = |pid: u32| {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match Holder::connect(&socket).unwrap() {
                Some(holder) if holder.pid() == pid => return holder,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => panic!("hold --socket (process {pid}) does not answer"),
            }
        }
    };
    let mut first = run();
    let _first_guard = KillOnDrop(first.id());
    let holder = wait_listening(first.id());
    let found = Holder::connect_or_start(&socket, Path::new("/nonexistent")).unwrap();
    assert_eq!(found.pid(), first.id(), "the daemon found the holder running");
    drop(found);

    let mut second = run();
    let _second_guard = KillOnDrop(second.id());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(second.try_wait().unwrap().is_none(), "the second holder gave up while the first ran");
    holder.quit().unwrap();
    assert!(first.wait().unwrap().success());
    let holder = wait_listening(second.id());
    holder.quit().unwrap();
    assert!(second.wait().unwrap().success());
    assert!(!socket.exists(), "a holder that quit leaves its socket file behind");
}
