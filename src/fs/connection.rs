//! FUSE connections that outlive the process serving them.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` file. [`mount`]
//! mounts with `mount(2)` itself, so that it holds that file and the kernel's `INIT`
//! request; [`serve`] starts a `fuser` session on such a connection, either fresh or
//! taken over from a process that served it before and died or stopped (its holder kept
//! the file: [`crate::restart`]).
//!
//! `fuser` only starts a session with the `INIT` handshake, and the kernel sends `INIT`
//! once per connection. So the session is started on one end of a socket pair instead,
//! with the `INIT` request written into the other end; its reply is read back there
//! (and written to the kernel for a fresh connection; a taken-over one had its reply
//! long ago), and the session's descriptor is then replaced by the connection's with
//! `dup3` before its threads start reading. A taken-over connection is then asked to
//! queue again the requests the previous process read but never answered
//! (`FUSE_NOTIFY_RESEND`, Linux 6.9).
//!
//! Every thread of a session reads the connection's one file: requests read through a
//! cloned descriptor (`FUSE_DEV_IOC_CLONE`) are aborted when that descriptor's process
//! dies, where those read through a file the holder keeps are queued again.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use fuser::{BackgroundSession, Config, Filesystem, Session, SessionACL};

/// `FUSE_INIT_EXT`: the `INIT` flags go on in `flags2`.
const INIT_EXT: u64 = 1 << 30;
/// `FUSE_PASSTHROUGH`, in the flags' upper half.
const PASSTHROUGH: u64 = 1 << 37;
/// `FUSE_HAS_RESEND`: the kernel takes `FUSE_NOTIFY_RESEND` (Linux 6.9, protocol 7.40).
const HAS_RESEND: u64 = 1 << 39;
/// `FUSE_NOTIFY_RESEND`.
const NOTIFY_RESEND: i32 = 7;
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;
/// The smallest buffer the kernel reads a request into.
const READ_BUFFER: usize = 64 << 10;
/// `fuse_in_header`: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
const IN_HEADER: usize = 40;
/// `fuse_out_header`: len, error, unique.
const OUT_HEADER: usize = 16;
/// `FUSE_INIT`.
const OP_INIT: u32 = 26;

/// A mounted FUSE connection: its `/dev/fuse` file and the kernel's `INIT` request.
#[derive(Debug)]
pub struct Connection {
    pub dev: OwnedFd,
    pub init: Vec<u8>,
}

/// Mounts a FUSE filesystem named `fsname` (type `fuse.modelpack`) at `path`: nosuid,
/// nodev, the kernel checking permissions, read-only if `read_only`, open to every user
/// if `allow_other`.
/// Returns the connection with the `INIT` request the kernel sent at once.
pub fn mount(path: &Path, fsname: &str, read_only: bool, allow_other: bool) -> std::io::Result<Connection> {
    let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
    // SAFETY: plain queries of this process's ids.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut data = format!("fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions", dev.as_raw_fd());
    if allow_other {
        data.push_str(",allow_other");
    }
    let c = |s: &str| std::ffi::CString::new(s).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e));
    let (source, target, kind, data) = (c(fsname)?, super::c_path(path)?, c("fuse.modelpack")?, c(&data)?);
    let flags = libc::MS_NOSUID | libc::MS_NODEV | if read_only { libc::MS_RDONLY } else { 0 };
    // SAFETY: every pointer is a valid NUL-terminated string outliving the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut dev = dev;
    let mut buf = vec![0u8; READ_BUFFER];
    let read = loop {
        match dev.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    let init = match read {
        Ok(n) if n >= IN_HEADER && u32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes")) == OP_INIT => {
            buf[..n].to_vec()
        }
        failed => {
            // The mount is there but will never be served: take it away again.
            let _ = super::detach(path);
            return Err(match failed {
                Ok(n) => std::io::Error::other(format!("the kernel's first request ({n} bytes) is not INIT")),
                Err(e) => e,
            });
        }
    };
    Ok(Connection { dev: dev.into(), init })
}

/// The capability flags of an `INIT` request (`fuse_init_in`: major, minor,
/// max_readahead, flags, flags2).
pub fn init_flags(init: &[u8]) -> u64 {
    let word = |at: usize| init.get(at..at + 4).map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    let flags = u64::from(word(IN_HEADER + 12));
    if flags & INIT_EXT != 0 {
        flags | u64::from(word(IN_HEADER + 16)) << 32
    } else {
        flags
    }
}

/// Whether the kernel that sent `init` lets a successor ask for unanswered requests
/// again (Linux 6.9 and later).
pub fn can_resend(init: &[u8]) -> bool {
    init_flags(init) & HAS_RESEND != 0
}

/// Whether the `INIT` reply `reply` turned FUSE passthrough on (`fuse_init_out`: major,
/// minor, max_readahead, flags, max_background, congestion_threshold, max_write,
/// time_gran, max_pages, map_alignment, flags2).
pub fn reply_passthrough(reply: &[u8]) -> bool {
    let word = |at: usize| reply.get(at..at + 4).map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    let flags = u64::from(word(OUT_HEADER + 12)) | u64::from(word(OUT_HEADER + 36)) << 32;
    flags & PASSTHROUGH != 0
}

/// Serves `fs` on the connection `dev`, whose `INIT` request was `init`, with `threads`
/// threads reading it. A fresh connection (`resume` false) gets `fs`'s `INIT` reply; a
/// taken-over one is asked to send again what its previous server left unanswered.
/// Returns the running session and the `INIT` reply `fs` made.
pub fn serve<FS: Filesystem + Send + 'static>(
    fs: FS,
    dev: &OwnedFd,
    init: &[u8],
    resume: bool,
    threads: usize,
    acl: SessionACL,
) -> std::io::Result<(BackgroundSession, Vec<u8>)> {
    let (mut ours, theirs) = seqpacket_pair()?;
    ours.write_all(init)?;
    let mut config = Config::default();
    config.acl = acl;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = false;
    let session = Session::from_fd(fs, theirs, acl, config)?;
    let mut reply = vec![0u8; 4096];
    let n = ours.read(&mut reply)?;
    reply.truncate(n);
    if n < OUT_HEADER || i32::from_ne_bytes(reply[4..8].try_into().expect("4 bytes")) != 0 {
        return Err(std::io::Error::other("the filesystem refused the connection's INIT"));
    }
    let mut file = std::fs::File::from(dev.try_clone()?);
    if !resume {
        file.write_all(&reply)?;
    }
    // SAFETY: both descriptors are open; the session's is replaced by a duplicate of the
    // connection's (same file), which the session then owns and closes as its own.
    if unsafe { libc::dup3(dev.as_raw_fd(), session.as_fd().as_raw_fd(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if resume {
        let mut notify = [0u8; OUT_HEADER];
        notify[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
        notify[4..8].copy_from_slice(&NOTIFY_RESEND.to_ne_bytes());
        file.write_all(&notify)?;
    }
    Ok((session.spawn()?, reply))
}

/// A connected pair of sequenced-packet Unix sockets: a message in, one message out.
fn seqpacket_pair() -> std::io::Result<(std::fs::File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is writable for two descriptors.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two new descriptors owned by nobody else.
    unsafe { Ok((std::fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// Registers `file` as a passthrough backing file of the connection `dev`; returns its
/// id, which stays open until [`close_backing`] (by this process or a successor).
pub fn open_backing(dev: &OwnedFd, file: &std::fs::File) -> std::io::Result<u32> {
    fuser::BackingId::create_raw(dev, file)
}

/// Closes backing id `id` of the connection `dev`.
pub fn close_backing(dev: &OwnedFd, id: u32) -> std::io::Result<()> {
    // SAFETY: the ioctl reads one u32 from a valid pointer.
    if unsafe { libc::ioctl(dev.as_raw_fd(), IOC_BACKING_CLOSE, &id as *const u32) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
