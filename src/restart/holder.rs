//! The fd holder: a process of its own (`modelpack-snapshotter hold`) that keeps
//! duplicates of the daemon's file descriptors (its `/dev/fuse` connections and listening
//! sockets) under names while the daemon restarts, and [`Holder`], the daemon's client of
//! it.
//!
//! A FUSE connection or a listening socket lives as long as some process keeps a
//! descriptor of it. The daemon puts each one here once it has it; a daemon that is killed
//! or stopped loses its own descriptors but not the holder's, and the next daemon takes
//! them back ([`Holder::take`]) instead of mounting or binding again: the mounts stay in
//! place, and clients of the sockets wait in the backlog instead of being refused. The
//! holder reads nothing from and writes nothing to the descriptors it holds. It runs in a
//! session of its own, so that what stops the daemon's process group or terminal leaves it
//! be; it ignores SIGHUP and SIGPIPE, and stops at SIGTERM or SIGKILL (or a QUIT).
//!
//! # Protocol
//!
//! A Unix `SOCK_SEQPACKET` socket. The holder serves one connection at a time: the daemon's
//! until it closes, then the next one (the restarted daemon's), which waits in the backlog
//! meanwhile. Each message is one request or one answer: its first byte says which, the
//! rest is a name where there is one (UTF-8, 1 to [`MAX_NAME`] bytes), and a descriptor
//! travels beside it as `SCM_RIGHTS`.
//!
//! | request  | bytes      | fds | answers                                                  |
//! |----------|------------|-----|----------------------------------------------------------|
//! | PUT      | `P` name   | 1   | `O`, once the fd is kept under name (closing the one held there before) |
//! | REMOVE   | `R` name   | 0   | `O`, once the fd held under name is closed (or if there is none) |
//! | TAKE     | `T`        | 0   | `F` name with 1 fd for each fd held, in the order of the names; then `D` |
//! | QUIT     | `Q`        | 0   | `O`, once the socket file is removed and every fd closed; then the holder exits |
//!
//! A malformed request is answered with `E` and what is wrong with it (UTF-8), and the
//! holder goes on. An empty message cannot be told from the end of the connection, and
//! ends it. The holder outlives upgrades of the daemon's binary, so a new daemon may talk
//! to an old holder: this protocol may grow, but what it says must not change.
//!
//! # Trust
//!
//! The holder and the daemon trust each other when they run as the same user, decided in
//! `same_user` from the connection's `SO_PEERCRED`, on both sides: the holder closes a
//! connection from another user without answering it, and the client refuses a holder of
//! another user. A process of the daemon's own user could take its descriptors by other
//! means (`pidfd_getfd`, ptrace) anyway.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{
    self as sock, sockopt, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, SockaddrStorage,
    UnixAddr, UnixCredentials,
};
use nix::unistd::geteuid;

/// The longest name, in bytes.
pub const MAX_NAME: usize = 1024;

/// The longest message: an opcode and a name (an error's reason is shorter).
const MAX_MESSAGE: usize = 1 + MAX_NAME;

// The first byte of a request.
const PUT: u8 = b'P';
const REMOVE: u8 = b'R';
const TAKE: u8 = b'T';
const QUIT: u8 = b'Q';

// The first byte of an answer.
const OK: u8 = b'O';
const ERROR: u8 = b'E';
const ENTRY: u8 = b'F';
const END: u8 = b'D';

/// The descriptor at which [`Holder::start`] hands the holder its listening socket.
const SOCKET_FD: RawFd = 3;

/// Connections that may wait while the holder serves another: a daemon being replaced,
/// its successor, and some to spare.
const BACKLOG: i32 = 16;

/// How long the holder waits before accepting again after a failure that may pass (no
/// descriptors or memory left), rather than spinning.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Why the holder, or a request to it, failed.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// The holder closed the connection: it exited, or was killed.
    #[error("the fd holder at {0} is gone")]
    Gone(PathBuf),
    /// The holder found the request malformed.
    #[error("the fd holder at {path} refused {request}: {reason}")]
    Refused { path: PathBuf, request: String, reason: String },
    /// An answer the request does not take: the holder is not speaking this protocol.
    #[error("the fd holder at {path} answered {request} with {problem}")]
    BadAnswer { path: PathBuf, request: String, problem: &'static str },
    /// An earlier failure may have left the connection out of step with the holder's
    /// answers; connecting again gives a fresh one.
    #[error("the connection to the fd holder at {0} was dropped after an earlier failure")]
    Dropped(PathBuf),
    /// The holder's user is not this process's (see the module doc, "Trust").
    #[error("the fd holder at {path} runs as uid {uid}, not as uid {ours} like this process")]
    OtherUser { path: PathBuf, uid: u32, ours: u32 },
    /// A name the protocol cannot carry.
    #[error("fd holder at {path}: {problem}")]
    BadName { path: PathBuf, problem: BadName },
    /// Something other than a socket is where the holder's socket should be.
    #[error("{0} exists and is not a socket, so no fd holder can listen there")]
    NotASocket(PathBuf),
    /// A holder answers at the path already; starting another would orphan it.
    #[error("an fd holder already listens at {0}")]
    Running(PathBuf),
    /// The program started as the holder closed its socket.
    #[error("the fd holder started at {path} with {program} is not listening")]
    NotStarted { path: PathBuf, program: PathBuf },
    /// `hold` was given a descriptor that is not a holder's socket.
    #[error("the fd holder's socket is not a listening Unix SOCK_SEQPACKET socket bound to a path")]
    NotListening,
    #[error("fd holder at {path}: cannot {op}: {cause}")]
    Io { op: &'static str, path: PathBuf, cause: io::Error },
}

impl From<HolderError> for io::Error {
    fn from(error: HolderError) -> Self {
        let kind = match &error {
            HolderError::Gone(_) => io::ErrorKind::BrokenPipe,
            HolderError::Refused { .. } | HolderError::BadName { .. } | HolderError::NotListening => {
                io::ErrorKind::InvalidInput
            }
            HolderError::BadAnswer { .. } => io::ErrorKind::InvalidData,
            HolderError::Dropped(_) => io::ErrorKind::NotConnected,
            HolderError::OtherUser { .. } => io::ErrorKind::PermissionDenied,
            HolderError::NotASocket(_) | HolderError::Running(_) => io::ErrorKind::AlreadyExists,
            HolderError::NotStarted { .. } => io::ErrorKind::ConnectionRefused,
            HolderError::Io { cause, .. } => cause.kind(),
        };
        io::Error::new(kind, error)
    }
}

/// Builds the error of a failed `op` of the holder at `path`, for `map_err`.
fn failed<'p, E: Into<io::Error>>(op: &'static str, path: &'p Path) -> impl FnOnce(E) -> HolderError + 'p {
    move |cause| HolderError::Io { op, path: path.to_owned(), cause: cause.into() }
}

/// Why a name cannot be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadName {
    #[error("the name is empty")]
    Empty,
    #[error("the name is longer than {MAX_NAME} bytes")]
    TooLong,
    #[error("the name is not UTF-8")]
    NotUtf8,
}

fn parse_name(bytes: &[u8]) -> Result<&str, BadName> {
    if bytes.is_empty() {
        Err(BadName::Empty)
    } else if bytes.len() > MAX_NAME {
        Err(BadName::TooLong)
    } else {
        std::str::from_utf8(bytes).map_err(|_| BadName::NotUtf8)
    }
}

/// Trust between the holder and the daemon: the peer of a connection must run as the
/// user this process runs as (see the module doc).
fn same_user(peer: &UnixCredentials) -> bool {
    peer.uid() == geteuid().as_raw()
}

/// One message read from a connection.
#[derive(Debug)]
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// The message was longer than [`MAX_MESSAGE`]: `bytes` is its beginning.
    truncated: bool,
    /// Descriptors sent with it did not all arrive: there were more than one, or this
    /// process had no descriptor free. Those that did not arrive were closed.
    fds_lost: bool,
}

/// Room for the control message of one descriptor (a second fits in its padding), aligned
/// for its header. The kernel closes the descriptors that do not fit.
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

// SAFETY: CMSG_SPACE only computes a length.
const CONTROL_LEN: usize = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;

/// Reads the next message of a connection; `None` at its end.
///
/// Not `nix`'s `recvmsg`: it hides the descriptors of a message whose control data was
/// cut short, and those must be closed, not leaked.
fn receive(connection: BorrowedFd<'_>) -> io::Result<Option<Message>> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut control = Control([0; CONTROL_LEN]);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is a valid, empty one.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = CONTROL_LEN as _;
    let len = loop {
        // SAFETY: `header` points at `iov`, which points into `buf`, and at `control`: all
        // live and writable for the lengths `header` and `iov` give.
        let read = unsafe { libc::recvmsg(connection.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
        match usize::try_from(read) {
            Ok(len) => break len,
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    };
    // Owned before anything else, so that they are closed whatever happens to the message.
    let fds = received_fds(&header);
    if len == 0 {
        return Ok(None);
    }
    Ok(Some(Message {
        bytes: buf[..len].to_vec(),
        fds,
        truncated: header.msg_flags & libc::MSG_TRUNC != 0,
        fds_lost: header.msg_flags & libc::MSG_CTRUNC != 0,
    }))
}

/// Takes ownership of the descriptors `SCM_RIGHTS` brought with a message `recvmsg` read
/// into `header`.
fn received_fds(header: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: recvmsg left `msg_controllen` bytes of well-formed control messages in the
    // control buffer, which CMSG_FIRSTHDR and CMSG_NXTHDR walk without leaving it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(header) };
    while !cmsg.is_null() {
        // SAFETY: a header these functions return lies, aligned, inside the buffer.
        let (level, kind, len) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len as usize) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a length.
            let data_len = len.saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize);
            // SAFETY: the data follows the header, inside the buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..data_len / size_of::<RawFd>() {
                // SAFETY: the kernel wrote `data_len` bytes of descriptors at `data`.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed this descriptor for this message alone.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR; `cmsg` is one of the buffer's headers.
        cmsg = unsafe { libc::CMSG_NXTHDR(header, cmsg) };
    }
    fds
}

/// Sends one message, with `fds` beside it.
fn send(connection: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [io::IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sock::sendmsg::<UnixAddr>(connection.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
}

fn encode(op: u8, text: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + text.len());
    bytes.push(op);
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

fn seqpacket_socket(path: &Path) -> Result<OwnedFd, HolderError> {
    sock::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(failed("create a socket", path))
}

fn backlog() -> Backlog {
    Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN)
}

/// A request, parsed.
#[derive(Debug)]
enum Request {
    Put(String, OwnedFd),
    Remove(String),
    Take,
    Quit,
}

/// What is wrong with a request: the reason the holder answers with.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum BadRequest {
    #[error("the request is empty")]
    Empty,
    #[error("the request is longer than {MAX_MESSAGE} bytes (a name is at most {MAX_NAME})")]
    TooLong,
    #[error("fds sent with the request did not all arrive (a request carries at most one, or the holder has no descriptor free)")]
    FdsLost,
    #[error("unknown request {0:#04x}")]
    Unknown(u8),
    #[error(transparent)]
    Name(#[from] BadName),
    #[error("PUT carries {0} fds, not one")]
    PutFds(usize),
    #[error("{0} carries fds")]
    StrayFds(&'static str),
    #[error("{0} takes no name")]
    StrayName(&'static str),
}

impl Request {
    /// Parses a request; the descriptors it does not keep are closed.
    fn parse(message: Message) -> Result<Request, BadRequest> {
        if message.truncated {
            return Err(BadRequest::TooLong);
        }
        if message.fds_lost {
            return Err(BadRequest::FdsLost);
        }
        let Some((&op, rest)) = message.bytes.split_first() else {
            return Err(BadRequest::Empty);
        };
        let bare = |what: &'static str, fds: &[OwnedFd]| {
            if fds.is_empty() {
                Ok(())
            } else {
                Err(BadRequest::StrayFds(what))
            }
        };
        match op {
            PUT => {
                let name = parse_name(rest)?.to_owned();
                match <[OwnedFd; 1]>::try_from(message.fds) {
                    Ok([fd]) => Ok(Request::Put(name, fd)),
                    Err(fds) => Err(BadRequest::PutFds(fds.len())),
                }
            }
            REMOVE => {
                bare("REMOVE", &message.fds)?;
                Ok(Request::Remove(parse_name(rest)?.to_owned()))
            }
            TAKE | QUIT => {
                let (what, request) = if op == TAKE { ("TAKE", Request::Take) } else { ("QUIT", Request::Quit) };
                bare(what, &message.fds)?;
                if !rest.is_empty() {
                    return Err(BadRequest::StrayName(what));
                }
                Ok(request)
            }
            op => Err(BadRequest::Unknown(op)),
        }
    }
}

/// An answer, parsed.
#[derive(Debug)]
enum Answer {
    Ok,
    Refused(String),
    Entry(String, OwnedFd),
    End,
}

impl Answer {
    /// Parses an answer, or says what is wrong with it.
    fn parse(message: Message) -> Result<Answer, &'static str> {
        if message.truncated {
            return Err("an answer longer than the protocol allows");
        }
        if message.fds_lost {
            return Err("fds that did not all arrive (has this process no descriptor free?)");
        }
        let Some((&op, rest)) = message.bytes.split_first() else {
            return Err("an empty answer");
        };
        let bare = rest.is_empty() && message.fds.is_empty();
        match op {
            OK if bare => Ok(Answer::Ok),
            END if bare => Ok(Answer::End),
            ERROR => Ok(Answer::Refused(String::from_utf8_lossy(rest).into_owned())),
            ENTRY => {
                let name = parse_name(rest).map_err(|_| "an entry whose name is malformed")?.to_owned();
                match <[OwnedFd; 1]>::try_from(message.fds) {
                    Ok([fd]) => Ok(Answer::Entry(name, fd)),
                    Err(_) => Err("an entry without exactly one fd"),
                }
            }
            _ => Err("an answer it does not know"),
        }
    }
}

/// Runs the holder on `listener`, a listening `SOCK_SEQPACKET` Unix socket bound to a
/// path, until a client asks it to quit: the `hold` command.
pub fn run(listener: OwnedFd) -> Result<(), HolderError> {
    let path = listening_path(&listener)?;
    for (sig, handler) in [
        (Signal::SIGHUP, SigHandler::SigIgn),
        (Signal::SIGPIPE, SigHandler::SigIgn),
        (Signal::SIGTERM, SigHandler::SigDfl),
    ] {
        // SAFETY: no handler of ours is installed, only the kernel's own dispositions.
        unsafe { signal(sig, handler) }.map_err(failed("set its signal dispositions", &path))?;
    }
    serve(listener, &path)
}

/// Runs a holder listening at `socket` that binds it itself: the `hold --socket` command,
/// for a holder that is not the daemon's child (a container of its own beside the
/// daemon's). While another holder answers there, it waits for that one to exit, checking
/// every `poll`; a stale socket file is replaced.
pub fn run_at(socket: &Path, poll: std::time::Duration) -> Result<(), HolderError> {
    let socket = &std::path::absolute(socket).map_err(failed("resolve its path", socket))?;
    loop {
        match clear_path(socket) {
            Err(HolderError::Running(_)) => std::thread::sleep(poll),
            cleared => break cleared?,
        }
    }
    run(listen_at(socket)?)
}

/// The path `listener` is bound to, once it is known to be a holder's socket.
fn listening_path(listener: &OwnedFd) -> Result<PathBuf, HolderError> {
    let seqpacket = sock::getsockopt(listener, sockopt::SockType).is_ok_and(|kind| kind == SockType::SeqPacket);
    let listening = sock::getsockopt(listener, sockopt::AcceptConn).unwrap_or(false);
    let address = sock::getsockname::<SockaddrStorage>(listener.as_raw_fd()).ok();
    let path = address.as_ref().and_then(SockaddrStorage::as_unix_addr).and_then(UnixAddr::path);
    match path {
        Some(path) if seqpacket && listening => Ok(path.to_owned()),
        _ => Err(HolderError::NotListening),
    }
}

/// The holder's loop: serves one client at a time until one asks it to quit.
fn serve(listener: OwnedFd, path: &Path) -> Result<(), HolderError> {
    // A client is told the credentials of whoever last called listen() on the socket:
    // make that the holder, not the daemon that bound it (`Holder::pid`).
    sock::listen(&listener, backlog()).map_err(failed("listen", path))?;
    let mut held = BTreeMap::new();
    loop {
        let connection = accept(&listener, path)?;
        match sock::getsockopt(&connection, sockopt::PeerCredentials) {
            Ok(peer) if same_user(&peer) => {}
            // Closed unanswered.
            _ => continue,
        }
        if let Served::Quit = serve_client(connection.as_fd(), &mut held) {
            // Before the answer, so that the client then finds the path free and every
            // fd closed. A socket file that stays behind is stale, and the next
            // `Holder::start` replaces it.
            let _ = std::fs::remove_file(path);
            drop(listener);
            held.clear();
            let _ = send(connection.as_fd(), &[OK], &[]);
            return Ok(());
        }
    }
}

/// The next connection; an error only when the listening socket cannot serve again.
fn accept(listener: &OwnedFd, path: &Path) -> Result<OwnedFd, HolderError> {
    loop {
        match sock::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 just made this descriptor, for us alone.
            Ok(raw) => return Ok(unsafe { OwnedFd::from_raw_fd(raw) }),
            Err(Errno::EINTR | Errno::ECONNABORTED) => {}
            Err(error @ (Errno::EBADF | Errno::EINVAL | Errno::ENOTSOCK | Errno::EOPNOTSUPP | Errno::EFAULT)) => {
                return Err(failed("accept connections", path)(error));
            }
            Err(_) => std::thread::sleep(ACCEPT_PAUSE),
        }
    }
}

/// How a client's connection ended.
enum Served {
    /// The client closed it, or it failed.
    Closed,
    /// The client asked the holder to quit (not answered yet).
    Quit,
}

/// Answers a client's requests until it closes the connection or asks to quit.
fn serve_client(connection: BorrowedFd<'_>, held: &mut BTreeMap<String, OwnedFd>) -> Served {
    loop {
        let Ok(Some(message)) = receive(connection) else {
            return Served::Closed;
        };
        let answered = match Request::parse(message) {
            Ok(Request::Put(name, fd)) => {
                held.insert(name, fd);
                send(connection, &[OK], &[])
            }
            Ok(Request::Remove(name)) => {
                held.remove(&name);
                send(connection, &[OK], &[])
            }
            Ok(Request::Take) => held
                .iter()
                .try_for_each(|(name, fd)| send(connection, &encode(ENTRY, name), &[fd.as_raw_fd()]))
                .and_then(|()| send(connection, &[END], &[])),
            Ok(Request::Quit) => return Served::Quit,
            Err(bad) => send(connection, &encode(ERROR, &bad.to_string()), &[]),
        };
        if answered.is_err() {
            return Served::Closed;
        }
    }
}

/// The daemon's connection to the fd holder. Threads that share it take turns: each
/// request and its answers go through the connection alone.
#[derive(Debug)]
pub struct Holder {
    socket: PathBuf,
    pid: u32,
    /// `None` once a failure may have left the connection out of step with the answers.
    connection: Mutex<Option<OwnedFd>>,
}

/// What a request makes of one answer.
enum Step {
    /// More answers follow.
    More,
    /// That was the last one.
    Done,
    /// Not an answer the request takes.
    Unexpected,
}

impl Holder {
    /// Connects to the holder listening at `socket`; `Ok(None)` when none is (no socket
    /// file, or connection refused). Requests wait while the holder serves another client.
    pub fn connect(socket: &Path) -> io::Result<Option<Holder>> {
        Ok(Self::dial(socket)?)
    }

    /// Starts a holder at `socket` and connects to it: binds `socket` (replacing a stale
    /// socket file there; anything that is not a socket is an error, and so is a holder
    /// that answers there), then runs `program hold --socket-fd 3` with the listening
    /// socket as its fd 3, in a session of its own (so that it shares neither the caller's
    /// process group nor its terminal), standard streams on `/dev/null`, in `/`. A thread
    /// of the caller reaps it if it exits while the caller lives.
    ///
    /// The daemon passes `/proc/self/exe` as `program`: its own binary, even once an
    /// upgrade replaced the file.
    pub fn start(socket: &Path, program: &Path) -> io::Result<Holder> {
        Ok(Self::launch(socket, program)?)
    }

    /// [`Holder::connect`], else [`Holder::start`].
    pub fn connect_or_start(socket: &Path, program: &Path) -> io::Result<Holder> {
        match Self::connect(socket)? {
            Some(holder) => Ok(holder),
            None => Self::start(socket, program),
        }
    }

    /// Every fd held, by name in order: a duplicate of each (the holder keeps its own).
    pub fn take(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        let mut taken = Vec::new();
        self.exchange("TAKE", &[TAKE], None, |answer| match answer {
            Answer::Entry(name, fd) => {
                taken.push((name, fd));
                Step::More
            }
            Answer::End => Step::Done,
            _ => Step::Unexpected,
        })?;
        Ok(taken)
    }

    /// Has the holder keep a duplicate of `fd` under `name`, closing the one it held
    /// under that name before.
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        Ok(self.ask("PUT", PUT, name, Some(fd))?)
    }

    /// Has the holder close the fd it holds under `name`, if any.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        Ok(self.ask("REMOVE", REMOVE, name, None)?)
    }

    /// Tells the holder to close everything and exit; returns once it has answered, when
    /// its socket file is gone and every fd it held closed.
    pub fn quit(&self) -> io::Result<()> {
        Ok(self.exchange("QUIT", &[QUIT], None, ok)?)
    }

    /// The holder's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn dial(socket: &Path) -> Result<Option<Holder>, HolderError> {
        let address = UnixAddr::new(socket).map_err(failed("use its path as a socket address", socket))?;
        let connection = seqpacket_socket(socket)?;
        match sock::connect(connection.as_raw_fd(), &address) {
            Ok(()) => {}
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => return Ok(None),
            Err(error) => return Err(failed("connect", socket)(error)),
        }
        let peer =
            sock::getsockopt(&connection, sockopt::PeerCredentials).map_err(failed("read its credentials", socket))?;
        if !same_user(&peer) {
            return Err(HolderError::OtherUser { path: socket.to_owned(), uid: peer.uid(), ours: geteuid().as_raw() });
        }
        Ok(Some(Holder {
            socket: socket.to_owned(),
            pid: peer.pid().unsigned_abs(),
            connection: Mutex::new(Some(connection)),
        }))
    }

    fn launch(socket: &Path, program: &Path) -> Result<Holder, HolderError> {
        // The holder runs in `/` and removes its socket file by the path it was bound to.
        let socket = &std::path::absolute(socket).map_err(failed("resolve its path", socket))?;
        clear_path(socket)?;
        let listener = listen_at(socket)?;
        let child = spawn(program, listener.as_fd()).map_err(|cause| HolderError::Io {
            op: "run its program",
            path: socket.to_owned(),
            cause,
        })?;
        // The holder's copy alone now keeps the socket listening.
        drop(listener);
        let pid = child.id();
        let reaped = socket.to_owned();
        std::thread::Builder::new()
            .name("fd-holder-reaper".into())
            .spawn(move || reap(child, &reaped))
            .map_err(failed("start a thread to reap it", socket))?;
        match Self::dial(socket)? {
            Some(holder) => Ok(Holder { pid, ..holder }),
            None => Err(HolderError::NotStarted { path: socket.to_owned(), program: program.to_owned() }),
        }
    }

    fn ask(&self, what: &str, op: u8, name: &str, fd: Option<BorrowedFd<'_>>) -> Result<(), HolderError> {
        parse_name(name.as_bytes()).map_err(|problem| HolderError::BadName { path: self.socket.clone(), problem })?;
        self.exchange(&format!("{what} {name:?}"), &encode(op, name), fd, ok)
    }

    /// Sends a request and hands its answers to `answered` until it says the last one
    /// came. A failure other than the holder's refusal drops the connection: answers of
    /// the request may still be on their way.
    fn exchange(
        &self,
        request: &str,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
        answered: impl FnMut(Answer) -> Step,
    ) -> Result<(), HolderError> {
        let mut connection = self.connection.lock().unwrap_or_else(|poisoned| {
            // A thread panicked amid a request: its answers may still be on their way.
            let mut connection = poisoned.into_inner();
            *connection = None;
            connection
        });
        let Some(live) = connection.as_ref() else {
            return Err(HolderError::Dropped(self.socket.clone()));
        };
        let outcome = self.converse(live.as_fd(), request, bytes, fd, answered);
        if matches!(&outcome, Err(error) if !matches!(error, HolderError::Refused { .. })) {
            *connection = None;
        }
        outcome
    }

    fn converse(
        &self,
        connection: BorrowedFd<'_>,
        request: &str,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
        mut answered: impl FnMut(Answer) -> Step,
    ) -> Result<(), HolderError> {
        let raw = fd.map(|fd| fd.as_raw_fd());
        send(connection, bytes, raw.as_slice()).map_err(|cause| self.lost("send a request", cause))?;
        let bad = |problem| HolderError::BadAnswer { path: self.socket.clone(), request: request.to_owned(), problem };
        loop {
            let message = receive(connection)
                .map_err(|cause| self.lost("read an answer", cause))?
                .ok_or_else(|| HolderError::Gone(self.socket.clone()))?;
            match Answer::parse(message).map_err(bad)? {
                Answer::Refused(reason) => {
                    return Err(HolderError::Refused { path: self.socket.clone(), request: request.to_owned(), reason })
                }
                answer => match answered(answer) {
                    Step::More => {}
                    Step::Done => return Ok(()),
                    Step::Unexpected => return Err(bad("an answer the request does not take")),
                },
            }
        }
    }

    /// The error of a failed send or receive: the holder is gone when its end is closed.
    fn lost(&self, op: &'static str, cause: io::Error) -> HolderError {
        match cause.raw_os_error() {
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => HolderError::Gone(self.socket.clone()),
            _ => HolderError::Io { op, path: self.socket.clone(), cause },
        }
    }
}

/// The answer of a request that only takes `O`.
fn ok(answer: Answer) -> Step {
    match answer {
        Answer::Ok => Step::Done,
        _ => Step::Unexpected,
    }
}

/// Makes way for a new holder's socket at `path`: a stale socket file goes; a holder
/// that answers there, or anything that is not a socket, stays and is an error.
fn clear_path(path: &Path) -> Result<(), HolderError> {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(failed("inspect its path", path)(error)),
        Ok(meta) if !meta.file_type().is_socket() => Err(HolderError::NotASocket(path.to_owned())),
        Ok(_) => {
            if Holder::dial(path)?.is_some() {
                return Err(HolderError::Running(path.to_owned()));
            }
            match std::fs::remove_file(path) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => {
                    Err(failed("remove its stale socket", path)(error))
                }
                _ => Ok(()),
            }
        }
    }
}

/// A new socket listening at `path`, at a descriptor above the standard streams (which
/// the child's `/dev/null` would replace before it could be moved to [`SOCKET_FD`]).
fn listen_at(path: &Path) -> Result<OwnedFd, HolderError> {
    let address = UnixAddr::new(path).map_err(failed("use its path as a socket address", path))?;
    let listener = seqpacket_socket(path)?;
    sock::bind(listener.as_raw_fd(), &address).map_err(failed("bind", path))?;
    sock::listen(&listener, backlog()).map_err(failed("listen", path))?;
    if listener.as_raw_fd() >= SOCKET_FD {
        return Ok(listener);
    }
    let raw = fcntl(&listener, FcntlArg::F_DUPFD_CLOEXEC(SOCKET_FD)).map_err(failed("move its socket", path))?;
    // SAFETY: fcntl just made this descriptor, for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Runs `program hold` with `listener` as its [`SOCKET_FD`], in a session of its own.
fn spawn(program: &Path, listener: BorrowedFd<'_>) -> io::Result<Child> {
    let fd = listener.as_raw_fd();
    let mut command = Command::new(program);
    command
        .args(["hold", "--socket-fd", &SOCKET_FD.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/");
    let prepare = move || {
        // SAFETY: setsid has no preconditions. Its own session: neither the caller's
        // process group nor its terminal.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        // dup2 leaves the copy open across exec, but does nothing when the socket is
        // already at SOCKET_FD: then its close-on-exec flag is cleared instead.
        // SAFETY: both act on descriptors this process has (`fd` is open: `listener`
        // outlives the spawn).
        let moved = unsafe {
            if fd == SOCKET_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, SOCKET_FD)
            }
        };
        if moved < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: `prepare` runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: setsid, fcntl and dup2 are, and it allocates
    // nothing.
    unsafe { command.pre_exec(prepare) };
    command.spawn()
}

/// Waits for the holder to exit, and says how it did.
fn reap(mut child: Child, socket: &Path) {
    match child.wait() {
        Ok(status) if status.success() => tracing::debug!(socket = %socket.display(), "fd holder exited"),
        Ok(status) => tracing::warn!(socket = %socket.display(), %status, "fd holder exited"),
        Err(error) => tracing::warn!(socket = %socket.display(), %error, "cannot wait for the fd holder"),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::thread::JoinHandle;

    use nix::fcntl::OFlag;
    use proptest::prelude::*;

    use super::*;

    /// The user the tests that play another user switch to (`nobody`).
    const OTHER_UID: u32 = 65534;

    /// A holder serving on a thread of the test, at a socket in a directory of its own.
    struct Fixture {
        dir: tempfile::TempDir,
        socket: PathBuf,
        thread: Option<JoinHandle<Result<(), HolderError>>>,
    }

    fn holder() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holder.sock");
        let listener = listen_at(&socket).unwrap();
        let path = socket.clone();
        let thread = std::thread::spawn(move || serve(listener, &path));
        Fixture { dir, socket, thread: Some(thread) }
    }

    impl Fixture {
        fn client(&self) -> Holder {
            Holder::connect(&self.socket).unwrap().expect("the holder listens")
        }

        /// A connection without the client, for requests the client would not send.
        fn raw(&self) -> OwnedFd {
            let connection = seqpacket_socket(&self.socket).unwrap();
            sock::connect(connection.as_raw_fd(), &UnixAddr::new(&self.socket).unwrap()).unwrap();
            connection
        }

        /// Stops the holder with a QUIT and returns how its loop ended.
        fn quit(mut self) -> Result<(), HolderError> {
            self.client().quit().unwrap();
            self.thread.take().unwrap().join().unwrap()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            if let Some(thread) = self.thread.take() {
                if let Ok(Some(client)) = Holder::connect(&self.socket) {
                    let _ = client.quit();
                }
                let _ = thread.join();
            }
        }
    }

    /// A pipe whose read end does not block: (read, write).
    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap()
    }

    /// Whether every copy of the pipe's write end is closed: a read sees the end.
    fn writer_closed(read: &OwnedFd) -> bool {
        let mut byte = [0u8; 1];
        match nix::unistd::read(read, &mut byte) {
            Ok(0) => true,
            Err(Errno::EAGAIN) => false,
            other => panic!("unexpected read of the pipe: {other:?}"),
        }
    }

    fn names(entries: &[(String, OwnedFd)]) -> Vec<&str> {
        entries.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// Sends a raw request and returns the reason of the error it must be answered with.
    fn refused(connection: &OwnedFd, bytes: &[u8], fds: &[RawFd]) -> String {
        send(connection.as_fd(), bytes, fds).unwrap();
        let answer = receive(connection.as_fd()).unwrap().expect("an answer");
        assert_eq!(answer.bytes.first(), Some(&ERROR), "{bytes:?} answered {:?}", answer.bytes);
        String::from_utf8(answer.bytes[1..].to_vec()).unwrap()
    }

    /// Runs `f` on a thread of its own whose effective uid is `uid`: the raw system call
    /// changes that thread's credentials alone. `None` where this process may not switch.
    fn as_user<T: Send + 'static>(uid: u32, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: setresuid changes the credentials of this thread only (not glibc's
            // wrapper, which would change every thread's); `uid_t::MAX` (-1) keeps the real
            // and saved uids, and the thread ends with `f`.
            let switched = unsafe { libc::syscall(libc::SYS_setresuid, libc::uid_t::MAX, uid, libc::uid_t::MAX) } == 0;
            switched.then(f)
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_restarted_client_takes_back_what_an_earlier_one_put() {
        let holder = holder();
        let (read, write) = pipe();
        holder.client().put("pipe", write.as_fd()).unwrap();
        drop(write);
        assert!(!writer_closed(&read), "the holder keeps the write end open");

        let restarted = holder.client();
        let taken = restarted.take().unwrap();
        assert_eq!(names(&taken), ["pipe"]);
        let (_, fd) = taken.into_iter().next().unwrap();
        File::from(fd).write_all(b"still here").unwrap();
        let mut got = [0u8; 10];
        File::from(read.try_clone().unwrap()).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still here");

        assert_eq!(names(&restarted.take().unwrap()), ["pipe"], "the holder keeps its own copy");
        drop(restarted);
        holder.quit().unwrap();
        assert!(writer_closed(&read), "QUIT closes what was held");
    }

    #[test]
    fn put_under_a_held_name_closes_the_fd_held_before() {
        let holder = holder();
        let client = holder.client();
        let (old_read, old_write) = pipe();
        let (new_read, new_write) = pipe();
        client.put("x", old_write.as_fd()).unwrap();
        drop(old_write);
        client.put("x", new_write.as_fd()).unwrap();
        drop(new_write);
        assert!(writer_closed(&old_read));
        assert!(!writer_closed(&new_read));

        let taken = client.take().unwrap();
        assert_eq!(names(&taken), ["x"]);
        let (_, fd) = taken.into_iter().next().unwrap();
        File::from(fd).write_all(b"n").unwrap();
        let mut got = [0u8; 1];
        File::from(new_read).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"n");
    }

    #[test]
    fn remove_closes_the_fd_and_unknown_names_are_fine() {
        let holder = holder();
        let client = holder.client();
        let (read, write) = pipe();
        client.put("gone soon", write.as_fd()).unwrap();
        drop(write);
        client.remove("gone soon").unwrap();
        assert!(writer_closed(&read));
        client.remove("never held").unwrap();
        assert!(client.take().unwrap().is_empty());
    }

    #[test]
    fn malformed_requests_are_answered_and_the_holder_goes_on() {
        let holder = holder();
        let (read, write) = pipe();
        let w = write.as_raw_fd();
        let connection = holder.raw();
        let long = encode(REMOVE, &"a".repeat(MAX_NAME + 1));
        let cases: [(&[u8], &[RawFd], &str); 10] = [
            (b"X", &[], "unknown request 0x58"),
            (b"Pname", &[], "PUT carries 0 fds, not one"),
            (b"Pname", &[w, w], "PUT carries 2 fds, not one"),
            // More than the control buffer has room for: the kernel closes the rest.
            (b"Pname", &[w; 8], "did not all arrive"),
            (b"P", &[w], "the name is empty"),
            (&long, &[], "longer than 1025 bytes"),
            (b"R\xff\xfe", &[], "not UTF-8"),
            (b"Rname", &[w], "REMOVE carries fds"),
            (b"Tname", &[], "TAKE takes no name"),
            (b"Q", &[w], "QUIT carries fds"),
        ];
        for (bytes, fds, expected) in cases {
            let reason = refused(&connection, bytes, fds);
            assert!(reason.contains(expected), "{bytes:?}: {reason:?} lacks {expected:?}");
        }
        send(connection.as_fd(), b"T", &[]).unwrap();
        assert_eq!(receive(connection.as_fd()).unwrap().unwrap().bytes, [END]);
        drop(connection);

        drop(write);
        assert!(writer_closed(&read), "the holder kept none of the fds of malformed requests");
        assert!(holder.client().take().unwrap().is_empty());
    }

    #[test]
    fn the_client_refuses_names_the_protocol_cannot_carry() {
        let holder = holder();
        let client = holder.client();
        let (_read, write) = pipe();
        for name in [String::new(), "a".repeat(MAX_NAME + 1)] {
            let error = client.put(&name, write.as_fd()).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        }
        client.put(&"a".repeat(MAX_NAME), write.as_fd()).unwrap();
        assert_eq!(client.take().unwrap().len(), 1);
    }

    #[test]
    fn take_answers_more_fds_than_one_message_can_carry() {
        let holder = holder();
        let client = holder.client();
        let null = File::open("/dev/null").unwrap();
        let mut expected: Vec<String> = (0..300).map(|i| format!("fd-{i:03}")).collect();
        for name in expected.iter().rev() {
            client.put(name, null.as_fd()).unwrap();
        }
        let taken = client.take().unwrap();
        expected.sort();
        assert_eq!(names(&taken), expected.iter().map(String::as_str).collect::<Vec<_>>());
        let null_ino = null.metadata().unwrap().ino();
        for (name, fd) in taken {
            assert_eq!(File::from(fd).metadata().unwrap().ino(), null_ino, "{name}");
        }
    }

    #[test]
    fn threads_sharing_a_client_take_turns() {
        let holder = holder();
        let client = holder.client();
        let null = File::open("/dev/null").unwrap();
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let (client, null) = (&client, &null);
                scope.spawn(move || {
                    for i in 0..20 {
                        client.put(&format!("{thread}-{i}"), null.as_fd()).unwrap();
                        client.take().unwrap();
                    }
                });
            }
        });
        assert_eq!(client.take().unwrap().len(), 160);
    }

    #[test]
    fn quit_removes_the_socket_and_ends_the_holder() {
        let holder = holder();
        let socket = holder.socket.clone();
        let client = holder.client();
        client.put("null", File::open("/dev/null").unwrap().as_fd()).unwrap();
        drop(client);
        holder.quit().unwrap();
        assert!(!socket.exists());
        assert!(Holder::connect(&socket).unwrap().is_none());
    }

    #[test]
    fn a_holder_that_went_away_is_named_in_the_error() {
        let holder = holder();
        let client = holder.client();
        client.quit().unwrap();
        let error = client.remove("x").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe, "{error}");
        assert_eq!(error.to_string(), format!("the fd holder at {} is gone", holder.socket.display()));
        let error = client.take().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotConnected, "{error}");
    }

    #[test]
    fn connect_finds_no_holder_where_none_listens() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holder.sock");
        assert!(Holder::connect(&socket).unwrap().is_none());
        // Bound, never listening: what a killed holder leaves.
        let stale = seqpacket_socket(&socket).unwrap();
        sock::bind(stale.as_raw_fd(), &UnixAddr::new(&socket).unwrap()).unwrap();
        drop(stale);
        assert!(Holder::connect(&socket).unwrap().is_none());
    }

    #[test]
    fn start_refuses_a_path_that_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        std::fs::write(&path, b"keep me").unwrap();
        let error = Holder::start(&path, Path::new("/nonexistent")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists, "{error}");
        assert!(error.to_string().contains(&path.display().to_string()), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn start_refuses_to_replace_a_holder_that_answers() {
        let holder = holder();
        let error = Holder::start(&holder.socket, Path::new("/nonexistent")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists, "{error}");
        assert!(holder.socket.exists());
        holder.client().take().unwrap();
    }

    #[test]
    fn the_holder_closes_a_connection_of_another_user_unanswered() {
        let holder = holder();
        std::fs::set_permissions(holder.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&holder.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (read, write) = pipe();
        let socket = holder.socket.clone();
        let attempt = as_user(OTHER_UID, move || {
            let connection = seqpacket_socket(&socket).unwrap();
            sock::connect(connection.as_raw_fd(), &UnixAddr::new(&socket).unwrap()).unwrap();
            // The holder may have closed the connection before this is sent.
            let _ = send(connection.as_fd(), b"Pmine", &[write.as_raw_fd()]);
            receive(connection.as_fd()).map(|answer| answer.map(|m| m.bytes))
        });
        let Some(answer) = attempt else {
            eprintln!("skipping: this process cannot switch a thread to uid {OTHER_UID}");
            return;
        };
        assert!(matches!(answer, Ok(None) | Err(_)), "another user was answered: {answer:?}");
        assert!(writer_closed(&read), "the holder kept another user's fd");
        assert!(holder.client().take().unwrap().is_empty());
    }

    #[test]
    fn the_client_refuses_a_holder_of_another_user() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holder.sock");
        let listener = seqpacket_socket(&socket).unwrap();
        sock::bind(listener.as_raw_fd(), &UnixAddr::new(&socket).unwrap()).unwrap();
        // A client is told the credentials of whoever called listen().
        let Some(listener) = as_user(OTHER_UID, move || sock::listen(&listener, backlog()).map(|()| listener)) else {
            eprintln!("skipping: this process cannot switch a thread to uid {OTHER_UID}");
            return;
        };
        let _listener = listener.unwrap();
        let error = Holder::connect(&socket).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        assert!(error.to_string().contains(&format!("uid {OTHER_UID}")), "{error}");
    }

    #[test]
    fn run_refuses_a_descriptor_that_is_not_a_holder_socket() {
        let null = OwnedFd::from(File::open("/dev/null").unwrap());
        assert!(matches!(run(null), Err(HolderError::NotListening)));
        let unbound = seqpacket_socket(Path::new("test")).unwrap();
        assert!(matches!(run(unbound), Err(HolderError::NotListening)));
    }

    fn message_of(bytes: Vec<u8>, truncated: bool, fds_lost: bool) -> Message {
        Message { bytes, fds: Vec::new(), truncated, fds_lost }
    }

    proptest! {
        #[test]
        fn parsing_any_message_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..1100),
            truncated: bool,
            fds_lost: bool,
        ) {
            let _ = Request::parse(message_of(bytes.clone(), truncated, fds_lost));
            let _ = Answer::parse(message_of(bytes, truncated, fds_lost));
        }
    }
}
