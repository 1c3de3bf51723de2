//! `AllowList`: the source addresses the listener accepts connections from (`callbacks.allow_from`).
//!
//! ThingSpace publishes the addresses its callbacks come from; listing them here means nobody else
//! can even start a request. Entries are addresses (`203.0.113.7`, `::1`) or networks
//! (`203.0.113.0/24`, `2001:db8::/32`). An empty list allows every address.

use std::net::IpAddr;

/// One allowed network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

/// The allowed source networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<Net>);

impl AllowList {
    /// Parses entries like `10.0.0.0/8`, `127.0.0.1`, `::1/128`; the error names the bad entry.
    pub fn parse(entries: &[String]) -> Result<AllowList, String> {
        entries
            .iter()
            .map(|entry| {
                let bad =
                    || format!("{entry:?} is not an IP address or network (like 203.0.113.0/24)");
                let (addr, prefix) = match entry.trim().split_once('/') {
                    Some((a, p)) => (
                        a.parse::<IpAddr>().map_err(|_| bad())?,
                        Some(p.parse::<u8>().map_err(|_| bad())?),
                    ),
                    None => (entry.trim().parse::<IpAddr>().map_err(|_| bad())?, None),
                };
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix = prefix.unwrap_or(max);
                if prefix > max {
                    return Err(bad());
                }
                Ok(Net { addr, prefix })
            })
            .collect::<Result<_, _>>()
            .map(AllowList)
    }

    /// Whether connections from `peer` are accepted.
    pub fn allows(&self, peer: IpAddr) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let peer = peer.to_canonical();
        self.0.iter().any(|net| match (net.addr, peer) {
            (IpAddr::V4(n), IpAddr::V4(p)) => prefix_eq(
                u128::from(u32::from(n)),
                u128::from(u32::from(p)),
                net.prefix,
                32,
            ),
            (IpAddr::V6(n), IpAddr::V6(p)) => {
                prefix_eq(u128::from(n), u128::from(p), net.prefix, 128)
            }
            _ => false,
        })
    }
}

/// The first `prefix` of `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (a >> shift) == (b >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("valid")
    }

    #[test]
    fn matches_addresses_and_networks() {
        let l = list(&["203.0.113.0/24", "198.51.100.7", "2001:db8::/32"]);
        assert!(l.allows("203.0.113.200".parse().expect("ip")));
        assert!(!l.allows("203.0.114.1".parse().expect("ip")));
        assert!(l.allows("198.51.100.7".parse().expect("ip")));
        assert!(!l.allows("198.51.100.8".parse().expect("ip")));
        assert!(l.allows("2001:db8:1::5".parse().expect("ip")));
        assert!(
            l.allows("::ffff:203.0.113.9".parse().expect("ip")),
            "IPv4-mapped IPv6"
        );
        assert!(!l.allows("127.0.0.1".parse().expect("ip")));
        assert!(
            list(&[]).allows("127.0.0.1".parse().expect("ip")),
            "empty allows all"
        );
        assert!(list(&["0.0.0.0/0"]).allows("8.8.8.8".parse().expect("ip")));
    }

    #[test]
    fn names_a_bad_entry() {
        let err = AllowList::parse(&["10.0.0.0/33".to_string()]).expect_err("bad prefix");
        assert!(err.contains("10.0.0.0/33"), "{err}");
        assert!(AllowList::parse(&["example.com".to_string()]).is_err());
    }
}
