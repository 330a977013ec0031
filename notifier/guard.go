package notifier

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"syscall"
)

// guard is the dialer's Control hook: it refuses loopback, link-local,
// private and unspecified addresses unless allow-listed (SSRF guard). It runs
// on the resolved address, so DNS rebinding cannot slip past it.
func (o *Outbox) guard(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return err
	}
	ip = ip.Unmap()
	if !internal(ip) {
		return nil
	}
	for _, a := range o.cfg.AllowHosts {
		if a == "localhost" && ip.IsLoopback() {
			return nil
		}
		if p, err := netip.ParsePrefix(a); err == nil && p.Contains(ip) {
			return nil
		}
		if p, err := netip.ParseAddr(a); err == nil && p.Unmap() == ip {
			return nil
		}
	}
	return fmt.Errorf("refusing to send a webhook to %s: loopback, link-local and private addresses need rules.notify.allow_hosts (SSRF guard)", ip)
}

// special are the ranges a webhook may not reach unless allow-listed beyond
// what netip's predicates cover: shared address space (carrier-grade NAT, RFC
// 6598), IETF protocol assignments, benchmarking, "this network" and the
// reserved class E (RFC 6890).
var special = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("240.0.0.0/4"),
}

// embedding are the IPv6 prefixes that carry an IPv4 address a router or
// translator will reach: NAT64 (RFC 6052, RFC 8215) with the address in the
// last 32 bits, and 6to4 (RFC 3056) with it in bits 16-47.
var (
	nat64  = []netip.Prefix{netip.MustParsePrefix("64:ff9b::/96"), netip.MustParsePrefix("64:ff9b:1::/48")}
	sixTo4 = netip.MustParsePrefix("2002::/16")
)

// internal reports whether ip is not a public unicast address: loopback,
// private, link-local, multicast, unspecified, a special range, or an IPv6
// address that translates to one of those.
func internal(ip netip.Addr) bool {
	if ip.IsLoopback() || ip.IsPrivate() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() ||
		ip.IsInterfaceLocalMulticast() || ip.IsUnspecified() || ip.IsMulticast() {
		return true
	}
	for _, p := range special {
		if p.Contains(ip) {
			return true
		}
	}
	if !ip.Is6() {
		return false
	}
	b := ip.As16()
	for _, p := range nat64 {
		if p.Contains(ip) {
			return internal(netip.AddrFrom4([4]byte(b[12:16])))
		}
	}
	if sixTo4.Contains(ip) {
		return internal(netip.AddrFrom4([4]byte(b[2:6])))
	}
	return false
}

// checkHost refuses, at start-up, a receiver whose host resolves to an
// address the guard would refuse (the dialer checks again on every connect).
func (o *Outbox) checkHost(r ReceiverConfig) error {
	u, _ := url.Parse(r.URL)
	host := u.Hostname()
	for _, a := range o.cfg.AllowHosts {
		if a == host {
			return nil
		}
	}
	addrs, err := net.DefaultResolver.LookupNetIP(context.Background(), "ip", host)
	if err != nil {
		o.log.Warn("notify: cannot resolve a receiver now; it is checked again on every delivery", "receiver", r.Name, "err", err)
		return nil
	}
	for _, ip := range addrs {
		if err := o.guard("tcp", net.JoinHostPort(ip.String(), "0"), nil); err != nil {
			return fmt.Errorf("rules.notify receiver %s (%s): %w", r.Name, r.URL, err)
		}
	}
	return nil
}
