//! A thin synchronous nfnetlink client: atomic batches and single requests
//! (gets and dumps). The socket lives in the network namespace of the
//! thread that opens it.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    none::ControlMessage, NetfilterHeader, NetfilterMessage, NetfilterMessageInner,
    NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use nix::errno::Errno;

use crate::{NftError, RawMsg, Req};

/// Netlink messages are 4-byte aligned.
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Large enough for any netlink datagram: the kernel sizes dump skbs at
/// most 32 KiB.
const RECV_BUF: usize = 64 * 1024;

pub struct Nfnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Socket buffer size last asked for ([`Nfnl::fit_buffers`]).
    buf_size: usize,
}

impl std::os::fd::AsRawFd for Nfnl {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

impl Nfnl {
    pub fn open() -> Result<Self, NftError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
        sock.bind_auto().map_err(NftError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NftError::Socket)?;
        // Errors need not echo our whole request back.
        let _ = sock.set_cap_ack(true);
        Ok(Nfnl {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
            buf_size: 0,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn push(
        &mut self,
        out: &mut Vec<u8>,
        inner: NetfilterMessageInner,
        res_id: u16,
        flags: u16,
    ) -> u32 {
        let family = match inner {
            NetfilterMessageInner::None(_) => NetfilterProtoFamily::Unspec,
            _ => NetfilterProtoFamily::Inet,
        };
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut m = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, res_id),
                inner,
            )),
        );
        m.finalize();
        let start = out.len();
        out.resize(start + align4(m.buffer_len()), 0);
        m.serialize(&mut out[start..]);
        seq
    }

    /// Sends `reqs` as one transaction: all apply or none does. On failure
    /// returns the error of the first failing request, in request order.
    ///
    /// Only the last request asks for an ACK: the kernel reports every
    /// failing request anyway, and answers in request order once the batch
    /// is done, so the last answer ends the exchange. An ACK per request
    /// would make a batch of thousands overflow the receive buffer (ENOBUFS).
    pub fn batch(&mut self, reqs: &[Req]) -> Result<(), NftError> {
        if reqs.is_empty() {
            return Ok(());
        }
        // The batch frame is addressed to the nftables subsystem via res_id.
        let res_id = NFNL_SUBSYS_NFTABLES;
        let mut out = Vec::new();
        let begin = self.push(
            &mut out,
            ControlMessage::BatchBegin.into(),
            res_id,
            NLM_F_REQUEST,
        );
        let first = begin.wrapping_add(1);
        for (i, r) in reqs.iter().enumerate() {
            let ack = if i + 1 == reqs.len() { NLM_F_ACK } else { 0 };
            self.push(
                &mut out,
                r.msg.clone().into(),
                0,
                NLM_F_REQUEST | ack | r.flags,
            );
        }
        let last = first.wrapping_add(reqs.len() as u32 - 1);
        let end = self.push(
            &mut out,
            ControlMessage::BatchEnd.into(),
            res_id,
            NLM_F_REQUEST,
        );
        self.fit_buffers(out.len());
        self.sock.send(&out, 0).map_err(NftError::Socket)?;

        let mut first_err: Option<(usize, Errno)> = None;
        let mut done = false;
        while !done {
            self.recv(|seq, reply| {
                let Reply::Status(code) = reply else {
                    return Ok(false);
                };
                if seq == begin || seq == end {
                    // The batch as a whole was refused (EPERM, ENOMEM...):
                    // nothing else will be answered.
                    let errno = code.unwrap_or(Errno::EINVAL);
                    return Err(NftError::Kernel {
                        what: "nftables batch".into(),
                        errno,
                    });
                }
                let i = seq.wrapping_sub(first) as usize;
                if i < reqs.len() {
                    if let Some(errno) = code {
                        if first_err.is_none_or(|(j, _)| i < j) {
                            first_err = Some((i, errno));
                        }
                    }
                }
                done = seq == last;
                Ok(done)
            })?;
        }
        match first_err {
            None => Ok(()),
            Some((i, errno)) => Err(NftError::Kernel {
                what: reqs[i].what.clone(),
                errno,
            }),
        }
    }

    /// Grows the socket's buffers for a batch of `len` bytes: the kernel
    /// refuses a datagram larger than the send buffer (EMSGSIZE), and a
    /// batch that fails in many places answers with as many errors. The
    /// FORCE variants pass the sysctl caps (we hold CAP_NET_ADMIN, or
    /// nothing here works); plain sizes are the fallback.
    fn fit_buffers(&mut self, len: usize) {
        let want = len + 64 * 1024;
        if want <= self.buf_size {
            return;
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.sock);
        let size = want.min(i32::MAX as usize) as libc::c_int;
        for (force, plain) in [
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        ] {
            for opt in [force, plain] {
                // SAFETY: a valid fd and a pointer to a c_int of the given size.
                let r = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        opt,
                        (&size as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if r == 0 {
                    break;
                }
            }
        }
        self.buf_size = want;
    }

    /// One request outside a batch: a GET (the reply object) or a dump (all
    /// objects). A dump the kernel marks inconsistent (the ruleset changed
    /// meanwhile) is retried.
    pub fn request(&mut self, req: &Req) -> Result<Vec<RawMsg>, NftError> {
        let mut attempts = 0;
        loop {
            match self.request_once(req) {
                Err(e) if e.errno() == Some(Errno::EINTR) && attempts < 5 => attempts += 1,
                r => return r,
            }
        }
    }

    fn request_once(&mut self, req: &Req) -> Result<Vec<RawMsg>, NftError> {
        let mut out = Vec::new();
        let seq = self.push(
            &mut out,
            req.msg.clone().into(),
            0,
            NLM_F_REQUEST | NLM_F_ACK | req.flags,
        );
        self.sock.send(&out, 0).map_err(NftError::Socket)?;
        let mut msgs = Vec::new();
        let mut interrupted = false;
        let mut status = None;
        while status.is_none() {
            self.recv(|s, reply| {
                if s != seq {
                    return Ok(false);
                }
                match reply {
                    Reply::Msg(m, intr) => {
                        interrupted |= intr;
                        msgs.push(m);
                        Ok(false)
                    }
                    Reply::Done(intr) => {
                        interrupted |= intr;
                        status = Some(None);
                        Ok(true)
                    }
                    Reply::Status(code) => {
                        status = Some(code);
                        Ok(true)
                    }
                }
            })?;
        }
        if let Some(Some(errno)) = status {
            return Err(NftError::Kernel {
                what: req.what.clone(),
                errno,
            });
        }
        if interrupted {
            return Err(NftError::Kernel {
                what: format!("{} (dump interrupted)", req.what),
                errno: Errno::EINTR,
            });
        }
        Ok(msgs)
    }

    /// Reads one datagram and hands each message in it to `f` with its
    /// sequence number, until `f` says it is done.
    fn recv(
        &mut self,
        mut f: impl FnMut(u32, Reply) -> Result<bool, NftError>,
    ) -> Result<(), NftError> {
        self.buf.clear();
        let n = loop {
            // MSG_TRUNC: return the datagram's real length, to detect a
            // too-short buffer.
            match self.sock.recv(&mut self.buf, libc::MSG_TRUNC) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.map_err(NftError::Socket)?,
            }
        };
        if n > self.buf.len() {
            return Err(NftError::Decode(format!(
                "netlink datagram of {n} bytes truncated"
            )));
        }
        // Replies are parsed by hand (see `reply`).
        let mut rest = &self.buf[..];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(NftError::Decode(format!(
                    "bad netlink message length {len}"
                )));
            }
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            let flags = u16::from_ne_bytes([rest[6], rest[7]]);
            let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
            let payload = &rest[NLMSG_HDRLEN..len];
            rest = &rest[align4(len).min(rest.len())..];
            let reply = match ty {
                NLMSG_ERROR => {
                    let code = payload
                        .get(0..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                        .ok_or_else(|| NftError::Decode("short NLMSG_ERROR".into()))?;
                    Reply::Status((code != 0).then(|| Errno::from_raw(-code)))
                }
                NLMSG_DONE => Reply::Done(flags & NLM_F_DUMP_INTR != 0),
                _ if ty >> 8 == NFNL_SUBSYS_NFTABLES && payload.len() >= NFGENMSG_LEN => {
                    Reply::Msg(
                        RawMsg {
                            kind: ty as u8,
                            attrs: payload[NFGENMSG_LEN..].to_vec(),
                        },
                        flags & NLM_F_DUMP_INTR != 0,
                    )
                }
                _ => continue,
            };
            if f(seq, reply)? {
                break;
            }
        }
        Ok(())
    }
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// struct nfgenmsg: family, version, res_id.
const NFGENMSG_LEN: usize = 4;

enum Reply {
    /// An object (GET reply or dump part); `true` when the dump is flagged
    /// inconsistent.
    Msg(RawMsg, bool),
    /// End of a dump; `true` as above.
    Done(bool),
    /// Ack (`None`) or error.
    Status(Option<Errno>),
}
