package ingest

import (
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/pool"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
)

// coapDedupMaxEntries bounds the answers the CoAP/UDP server keeps for
// deduplication, over all peers: about 108 bytes each (BenchmarkDedupCacheMemory),
// ~93 MiB when full. At 20,000 requests/s that is 45 s of answers, the span
// of a client's retransmissions (MAX_TRANSMIT_SPAN); below 3,644 requests/s
// the whole EXCHANGE_LIFETIME (247 s). 900,000 fills the map's 2^20 slots to
// its 7/8 load without a next doubling.
const coapDedupMaxEntries = 900_000

// dedupCache keeps the answers of the CoAP/UDP server by (peer, message id)
// for EXCHANGE_LIFETIME, so that a retransmitted request is answered again
// and not handled twice (RFC 7252 §4.5). It is shared by all peers and
// bounded: one peer holds at most 65,536 answers (the message-id space), all
// peers together at most max; past that the oldest answer, whoever's, is
// dropped first. Every answer lives equally long, so a FIFO holds them in
// expiry order and expiring pops only what expired. A peer's answers outlive
// its connection state (dropped after 16 s idle): a retransmission after a
// pause is still recognised.
type dedupCache struct {
	max      int
	lifetime time.Duration

	mu      sync.Mutex
	m       map[dedupKey]dedupEntry
	big     map[dedupKey][]byte // answers too long to keep inline
	order   []dedupSlot         // FIFO from head
	head    int
	peers   map[netip.AddrPort]*dedupPeer
	byID    map[uint64]*dedupPeer
	nextID  uint64
	bytes   int
	evicted uint64 // dropped before their lifetime by the bound
}

type dedupKey struct {
	peer uint64
	mid  uint16
}

// dedupEntry is one answer. A small answer (a 2.04 or 4.xx with its token:
// 4 + 8 bytes and a few options) is kept inline, so that the map holds no
// pointers (the collector does not scan it) and costs no allocation; a larger
// one is in dedupCache.big.
type dedupEntry struct {
	until int64 // unix nanoseconds
	n     uint8 // inline length; 0: in big
	small [dedupInline]byte
}

const dedupInline = 23

// dedupPending is the inline length of an entry whose request is being
// handled (claim): a duplicate meanwhile is dropped, not handled twice.
const dedupPending = 0xff

type dedupSlot struct {
	key   dedupKey
	until int64
}

// dedupPeer is a peer's id in the keys and how many answers it holds.
type dedupPeer struct {
	id   uint64
	addr netip.AddrPort
	n    int
}

func newDedupCache(max int) *dedupCache {
	return &dedupCache{max: max, lifetime: udpclient.ExchangeLifetime,
		m: map[dedupKey]dedupEntry{}, big: map[dedupKey][]byte{}, peers: map[netip.AddrPort]*dedupPeer{}, byID: map[uint64]*dedupPeer{}}
}

// forPeer is the cache as go-coap's connection to addr sees it.
func (c *dedupCache) forPeer(addr netip.AddrPort) *peerDedup {
	return &peerDedup{c: c, addr: addr}
}

// load copies the live answer to (addr, mid) into msg.
func (c *dedupCache) load(addr netip.AddrPort, mid uint16, msg *pool.Message, now time.Time) (bool, error) {
	var buf [dedupInline]byte
	var raw []byte
	c.mu.Lock()
	if p := c.peers[addr]; p != nil {
		k := dedupKey{p.id, mid}
		if e, ok := c.m[k]; ok && now.UnixNano() < e.until && e.n != dedupPending {
			raw = c.big[k]
			if e.n > 0 {
				raw = buf[:copy(buf[:], e.small[:e.n])]
			}
		}
	}
	c.mu.Unlock()
	if raw == nil {
		return false, nil
	}
	if _, err := msg.UnmarshalWithDecoder(coder.DefaultCoder, raw); err != nil {
		return false, err
	}
	return true, nil
}

// claimState is what claim found.
type claimState int

const (
	claimed  claimState = iota // nothing: the caller handles the request and stores its answer
	answered                   // a live answer, to send again
	busy                       // the request is being handled: drop the duplicate
)

// claim looks (addr, mid) up for the direct path: a live answer is appended
// to dst; a request being handled is busy; otherwise the entry is marked as
// being handled, and the caller must store its answer.
func (c *dedupCache) claim(dst []byte, addr netip.AddrPort, mid uint16, now time.Time) ([]byte, claimState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p := c.peers[addr]; p != nil {
		k := dedupKey{p.id, mid}
		if e, ok := c.m[k]; ok && now.UnixNano() < e.until {
			switch {
			case e.n == dedupPending:
				return dst, busy
			case e.n > 0:
				return append(dst, e.small[:e.n]...), answered
			default:
				return append(dst, c.big[k]...), answered
			}
		}
	}
	c.put(addr, mid, nil, now)
	return dst, claimed
}

// release forgets the claim on (addr, mid), if it is still one: the request
// was not answered, and a copy of it is to be handled as new.
func (c *dedupCache) release(addr netip.AddrPort, mid uint16) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.peers[addr]
	if p == nil {
		return
	}
	k := dedupKey{p.id, mid}
	if e, ok := c.m[k]; !ok || e.n != dedupPending {
		return
	}
	delete(c.m, k) // its FIFO slot is skipped when popped
	c.unref(p)
}

// store keeps raw as the answer to (addr, mid) unless a live one is kept
// (go-coap's LoadOrStore semantics); it replaces a claim.
func (c *dedupCache) store(addr netip.AddrPort, mid uint16, raw []byte, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.put(addr, mid, raw, now)
}

// put is store with c.mu held; raw nil puts a claim.
func (c *dedupCache) put(addr netip.AddrPort, mid uint16, raw []byte, now time.Time) {
	var k dedupKey
	var old dedupEntry
	had := false
	if p := c.peers[addr]; p != nil {
		k = dedupKey{p.id, mid}
		if old, had = c.m[k]; had && now.UnixNano() < old.until && (old.n != dedupPending || raw == nil) {
			return
		}
	}
	if !had {
		// make room first: it may take this peer's last answer, and the
		// peer with it
		for len(c.m) >= c.max && c.popOldest() {
			c.evicted++
		}
		p := c.peer(addr)
		p.n++
		k = dedupKey{p.id, mid}
	}
	c.drop(k, old)
	until := now.Add(c.lifetime).UnixNano()
	e := dedupEntry{until: until}
	switch {
	case raw == nil:
		e.n = dedupPending
	case len(raw) > 0 && len(raw) <= dedupInline:
		e.n = uint8(copy(e.small[:], raw))
	default:
		c.big[k] = append([]byte(nil), raw...)
	}
	c.bytes += len(raw)
	c.m[k] = e
	c.order = append(c.order, dedupSlot{key: k, until: until})
}

// peer returns addr's entry, made if it has none.
func (c *dedupCache) peer(addr netip.AddrPort) *dedupPeer {
	p := c.peers[addr]
	if p == nil {
		c.nextID++
		p = &dedupPeer{id: c.nextID, addr: addr}
		c.peers[addr] = p
		c.byID[p.id] = p
	}
	return p
}

// popOldest drops the oldest answer kept; it reports whether there was one.
func (c *dedupCache) popOldest() bool {
	for c.head < len(c.order) {
		if c.pop() {
			return true
		}
	}
	return false
}

// pop removes the FIFO's head slot and its answer unless the answer was
// stored again since (a later slot has it); it reports whether one was removed.
func (c *dedupCache) pop() bool {
	s := c.order[c.head]
	c.order[c.head] = dedupSlot{}
	c.head++
	e, ok := c.m[s.key]
	if !ok || e.until != s.until {
		return false
	}
	delete(c.m, s.key)
	c.drop(s.key, e)
	c.unref(c.byID[s.key.peer])
	return true
}

// unref counts one entry of p's less, and forgets p with its last.
func (c *dedupCache) unref(p *dedupPeer) {
	if p.n--; p.n == 0 {
		delete(c.peers, p.addr)
		delete(c.byID, p.id)
	}
}

// drop forgets e's bytes (the map entry itself is the caller's).
func (c *dedupCache) drop(k dedupKey, e dedupEntry) {
	if e.n == dedupPending {
		return
	}
	if e.n > 0 {
		c.bytes -= int(e.n)
		return
	}
	if b, ok := c.big[k]; ok {
		c.bytes -= len(b)
		delete(c.big, k)
	}
}

// expire drops the answers whose lifetime is over.
func (c *dedupCache) expire(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := now.UnixNano()
	for c.head < len(c.order) && c.order[c.head].until <= t {
		c.pop()
	}
	if c.head > 1024 && c.head > len(c.order)/2 {
		c.order = append(c.order[:0:0], c.order[c.head:]...)
		c.head = 0
	}
}

// stats returns the answers kept, their bytes, and how many the bound dropped.
func (c *dedupCache) stats() (entries, bytes int, evicted uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m), c.bytes, c.evicted
}

// peerDedup is dedupCache as one peer's go-coap connection uses it
// (udpclient.MessageCache): go-coap's keys are the message id in decimal.
// Expiring is the server's once-a-second pass over the whole cache.
type peerDedup struct {
	c    *dedupCache
	addr netip.AddrPort
}

func (p *peerDedup) Load(key string, msg *pool.Message) (bool, error) {
	mid, err := strconv.ParseUint(key, 10, 16)
	if err != nil {
		return false, nil
	}
	return p.c.load(p.addr, uint16(mid), msg, time.Now())
}

func (p *peerDedup) Store(key string, msg *pool.Message) error {
	mid, err := strconv.ParseUint(key, 10, 16)
	if err != nil {
		return nil // not a message id: nothing to deduplicate by
	}
	raw, err := msg.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		return err
	}
	p.c.store(p.addr, uint16(mid), raw, time.Now())
	return nil
}

func (p *peerDedup) CheckExpirations(time.Time) {}
