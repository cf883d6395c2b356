//! Choosing the address a node publishes: the interface selection a user
//! expects from Open MPI's TCP transport (include or exclude lists of
//! interface names or CIDR subnets).

use crate::error::{Error, Result};
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr};

/// An IPv4 interface address.
#[derive(Debug, Clone)]
pub struct IfAddr {
    /// Interface name.
    pub name: String,
    /// Address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

/// IPv4 addresses of the interfaces that are up.
pub fn interfaces() -> Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p walks the list returned by getifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
            continue;
        }
        // SAFETY: non-null sockaddr from getifaddrs.
        if unsafe { (*ifa.ifa_addr).sa_family } as i32 != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET addresses are sockaddr_in; name is a C string.
        let (addr, mask, name) = unsafe {
            let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let m = if ifa.ifa_netmask.is_null() {
                0
            } else {
                u32::from_be(
                    (*(ifa.ifa_netmask as *const libc::sockaddr_in))
                        .sin_addr
                        .s_addr,
                )
            };
            (
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                m,
                CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned(),
            )
        };
        out.push(IfAddr {
            name,
            addr,
            prefix: mask.count_ones() as u8,
        });
    }
    // SAFETY: frees the list from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// One include/exclude entry: an interface name or an IPv4 subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfSpec {
    /// Interface name.
    Name(String),
    /// Subnet.
    Net(Ipv4Addr, u8),
}

impl IfSpec {
    /// Parses `eth0` or `10.0.0.0/8` (a bare address means /32).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::Invalid("empty interface entry".into()));
        }
        if s.as_bytes()[0].is_ascii_digit() {
            let (a, p) = s.split_once('/').unwrap_or((s, "32"));
            let addr: Ipv4Addr = a
                .parse()
                .map_err(|_| Error::Invalid(format!("bad subnet '{s}'")))?;
            let prefix: u8 = p
                .parse()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| Error::Invalid(format!("bad prefix in '{s}'")))?;
            Ok(IfSpec::Net(addr, prefix))
        } else {
            Ok(IfSpec::Name(s.to_string()))
        }
    }

    /// Parses a comma-separated list.
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        s.split(',')
            .filter(|x| !x.trim().is_empty())
            .map(Self::parse)
            .collect()
    }

    fn matches(&self, i: &IfAddr) -> bool {
        match self {
            IfSpec::Name(n) => *n == i.name,
            IfSpec::Net(net, p) => {
                let mask = if *p == 0 { 0 } else { u32::MAX << (32 - p) };
                u32::from(*net) & mask == u32::from(i.addr) & mask
            }
        }
    }
}

/// Picks the address to publish. With an include list, the first interface
/// address it matches; otherwise the first non-loopback address not
/// excluded, then loopback if nothing else is up.
pub fn select(include: &[IfSpec], exclude: &[IfSpec]) -> Result<IpAddr> {
    let all = interfaces()?;
    if !include.is_empty() {
        return all
            .iter()
            .find(|i| include.iter().any(|s| s.matches(i)))
            .map(|i| IpAddr::V4(i.addr))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no interface matches the include list {include:?} (have: {})",
                    all.iter()
                        .map(|i| format!("{}={}/{}", i.name, i.addr, i.prefix))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            });
    }
    let ok = |i: &&IfAddr| !exclude.iter().any(|s| s.matches(i));
    all.iter()
        .filter(ok)
        .find(|i| !i.addr.is_loopback())
        .or_else(|| all.iter().filter(ok).find(|i| i.addr.is_loopback()))
        .map(|i| IpAddr::V4(i.addr))
        .ok_or_else(|| Error::Invalid("no usable IPv4 interface".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(IfSpec::parse("eth0").unwrap(), IfSpec::Name("eth0".into()));
        assert_eq!(
            IfSpec::parse("10.1.0.0/16").unwrap(),
            IfSpec::Net("10.1.0.0".parse().unwrap(), 16)
        );
        assert!(IfSpec::parse("10.1.0.0/40").is_err());
        let lo = IfAddr {
            name: "lo".into(),
            addr: "127.0.0.1".parse().unwrap(),
            prefix: 8,
        };
        assert!(IfSpec::parse("127.0.0.0/8").unwrap().matches(&lo));
        assert!(!IfSpec::parse("10.0.0.0/8").unwrap().matches(&lo));
        assert!(select(&[IfSpec::Name("lo".into())], &[])
            .unwrap()
            .is_loopback());
    }
}
