package ingest

import (
	"fmt"
	"sync"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
)

// optionRequestTag is the Request-Tag option (RFC 9175 §3): it tells apart
// block-wise bodies a client sends concurrently to the same resource.
const optionRequestTag = 292

// Counted reasons for refusing a block of a block-wise upload
// (citypulse_coap_blockwise_rejected_total{reason}).
const (
	BlockReasonBadBlock    = "bad_block"    // a block whose size does not match its Block1 option
	BlockReasonIncomplete  = "incomplete"   // a block after a gap, or of an upload not started or expired
	BlockReasonTooLarge    = "too_large"    // the body would exceed the largest accepted message
	BlockReasonSourceLimit = "source_limit" // the source address holds as many partial uploads (or bytes) as it may
	BlockReasonTotalLimit  = "total_limit"  // the server holds as many partial uploads (or bytes) as it may
	BlockReasonExpired     = "expired"      // an upload dropped after ingest.coap.blockwise.timeout without a block
)

// BlockwiseConfig bounds the partial block-wise uploads (RFC 7959 Block1) the
// CoAP gateway holds while their blocks arrive.
type BlockwiseConfig struct {
	// Timeout drops a partial upload that has received no block for this long.
	Timeout time.Duration `mapstructure:"timeout" yaml:"timeout"`
	// MaxUploads and MaxBytes bound the partial uploads held over all sources.
	MaxUploads int   `mapstructure:"max_uploads" yaml:"max_uploads"`
	MaxBytes   int64 `mapstructure:"max_bytes" yaml:"max_bytes"`
	// MaxUploadsPerSource and MaxBytesPerSource bound those of one source IP address.
	MaxUploadsPerSource int   `mapstructure:"max_uploads_per_source" yaml:"max_uploads_per_source"`
	MaxBytesPerSource   int64 `mapstructure:"max_bytes_per_source" yaml:"max_bytes_per_source"`
}

// DefaultBlockwise returns the default bounds.
func DefaultBlockwise() BlockwiseConfig {
	return BlockwiseConfig{Timeout: 30 * time.Second, MaxUploads: 1024, MaxBytes: 32 << 20,
		MaxUploadsPerSource: 16, MaxBytesPerSource: 1 << 20}
}

// Validate checks the bounds; messages name the offending key.
func (c BlockwiseConfig) Validate() error {
	const k = "ingest.coap.blockwise."
	switch {
	case c.Timeout <= 0:
		return fmt.Errorf(k+"timeout must be > 0, got %v", c.Timeout)
	case c.MaxUploads <= 0 || c.MaxBytes <= 0 || c.MaxUploadsPerSource <= 0 || c.MaxBytesPerSource <= 0:
		return fmt.Errorf(k + "max_uploads, max_bytes, max_uploads_per_source and max_bytes_per_source must be > 0")
	case c.MaxUploadsPerSource > c.MaxUploads:
		return fmt.Errorf(k+"max_uploads_per_source (%d) must not exceed max_uploads (%d)", c.MaxUploadsPerSource, c.MaxUploads)
	case c.MaxBytesPerSource > c.MaxBytes:
		return fmt.Errorf(k+"max_bytes_per_source (%d) must not exceed max_bytes (%d)", c.MaxBytesPerSource, c.MaxBytes)
	}
	return nil
}

// uploadKey identifies one block-wise body: RFC 7959 §2.4 lets a client use a
// new token for every block, so the blocks of one body are matched by
// endpoint, request URI and Request-Tag instead.
type uploadKey struct {
	endpoint string // transport and remote ip:port
	uri      string // path and query
	tag      string // Request-Tag value
	tagged   bool   // an absent Request-Tag differs from an empty one
}

// block is one request carrying a Block1 option.
type block struct {
	num  int64
	more bool
	szx  blockwise.SZX
	data []byte
}

func (b block) size() int64 { return b.szx.Size() }

// blockError refuses a block: code is the CoAP answer, reason the counted reason.
type blockError struct {
	code   codes.Code
	reason string
	msg    string
}

func (e *blockError) Error() string { return e.msg }

// upload is a partial body; its buffer's capacity is what it holds.
type upload struct {
	source string
	body   []byte
	last   time.Time
}

// usage is what one source (or the whole server) holds.
type usage struct {
	uploads int
	bytes   int64
}

// uploads is the bounded reassembly table of block-wise request bodies.
type uploads struct {
	cfg     BlockwiseConfig
	maxBody int64
	dropped func(reason string) // counts an upload dropped without an answer (expiry)

	mu        sync.Mutex
	m         map[uploadKey]*upload
	bySource  map[string]*usage
	total     usage
	lastSweep time.Time
}

func newUploads(cfg BlockwiseConfig, maxBody int64, dropped func(string)) *uploads {
	return &uploads{cfg: cfg, maxBody: maxBody, dropped: dropped,
		m: map[uploadKey]*upload{}, bySource: map[string]*usage{}}
}

// held returns the number of partial uploads and the bytes they hold.
func (u *uploads) held() (int, int64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.total.uploads, u.total.bytes
}

// maxUpload is the largest body an upload may reach.
func (u *uploads) maxUpload() int64 { return min(u.maxBody, u.cfg.MaxBytesPerSource) }

// add stores b, the block of the body k from source. It returns the whole body
// with the last block, nil with a block that leaves the body unfinished, or a
// *blockError. Blocks arrive in order; a block repeated or sent again from an
// earlier offset rewinds the body to that offset.
func (u *uploads) add(k uploadKey, source string, b block, now time.Time) ([]byte, error) {
	size := b.size()
	if b.szx > blockwise.SZX1024 || (b.more && int64(len(b.data)) != size) || int64(len(b.data)) > size {
		u.drop(k)
		return nil, &blockError{codes.BadRequest, BlockReasonBadBlock,
			fmt.Sprintf("block %d: %d bytes, want %d (szx %d) and all blocks but the last full", b.num, len(b.data), size, b.szx)}
	}
	off := b.num * size
	if off+int64(len(b.data)) > u.maxUpload() {
		u.drop(k)
		return nil, tooLarge(u.maxUpload())
	}
	if b.num == 0 && !b.more {
		u.drop(k)
		return b.data, nil
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.sweep(now, false)
	e := u.m[k]
	if e != nil && now.Sub(e.last) >= u.cfg.Timeout {
		u.remove(k, e)
		u.dropped(BlockReasonExpired)
		e = nil
	}
	if e == nil {
		if off != 0 {
			return nil, &blockError{codes.RequestEntityIncomplete, BlockReasonIncomplete,
				fmt.Sprintf("block %d of an upload not started or expired: start again with block 0", b.num)}
		}
		var err error
		if e, err = u.start(k, source, now); err != nil {
			return nil, err
		}
	}
	if off > int64(len(e.body)) {
		u.remove(k, e)
		return nil, &blockError{codes.RequestEntityIncomplete, BlockReasonIncomplete,
			fmt.Sprintf("block %d after %d bytes: a block is missing, start again with block 0", b.num, len(e.body))}
	}
	e.body = e.body[:off]
	if err := u.grow(k, e, len(b.data)); err != nil {
		return nil, err
	}
	e.body = append(e.body, b.data...)
	e.last = now
	if b.more {
		return nil, nil
	}
	u.remove(k, e)
	return e.body, nil
}

func tooLarge(max int64) *blockError {
	return &blockError{codes.RequestEntityTooLarge, BlockReasonTooLarge, fmt.Sprintf("body over %d bytes", max)}
}

// start adds an empty upload within the per-source and total bounds, after
// dropping expired ones if the bounds are reached.
func (u *uploads) start(k uploadKey, source string, now time.Time) (*upload, error) {
	s := u.bySource[source]
	full := func() bool {
		return u.total.uploads >= u.cfg.MaxUploads || (s != nil && s.uploads >= u.cfg.MaxUploadsPerSource)
	}
	if full() {
		u.sweep(now, true)
		s = u.bySource[source]
	}
	if s != nil && s.uploads >= u.cfg.MaxUploadsPerSource {
		return nil, u.busy(BlockReasonSourceLimit, fmt.Sprintf("this address already has %d unfinished uploads", s.uploads))
	}
	if u.total.uploads >= u.cfg.MaxUploads {
		return nil, u.busy(BlockReasonTotalLimit, "too many unfinished uploads")
	}
	if s == nil {
		s = &usage{}
		u.bySource[source] = s
	}
	s.uploads++
	u.total.uploads++
	e := &upload{source: source, last: now}
	u.m[k] = e
	return e, nil
}

// grow makes room for n more bytes in e, within the bounds; over a bound it
// drops e, since it could not finish.
func (u *uploads) grow(k uploadKey, e *upload, n int) error {
	if cap(e.body)-len(e.body) >= n {
		return nil
	}
	need := int64(len(e.body) + n)
	newCap := min(max(2*int64(cap(e.body)), need), u.maxUpload())
	more := newCap - int64(cap(e.body))
	s := u.bySource[e.source]
	switch {
	case s.bytes+more > u.cfg.MaxBytesPerSource:
		u.remove(k, e)
		return u.busy(BlockReasonSourceLimit, fmt.Sprintf("this address already holds %d bytes of unfinished uploads", s.bytes))
	case u.total.bytes+more > u.cfg.MaxBytes:
		u.remove(k, e)
		return u.busy(BlockReasonTotalLimit, "too many bytes in unfinished uploads")
	}
	b := make([]byte, len(e.body), newCap)
	copy(b, e.body)
	e.body = b
	s.bytes += more
	u.total.bytes += more
	return nil
}

// busy is a refusal for lack of room: the client may retry after the timeout,
// when unfinished uploads have expired.
func (u *uploads) busy(reason, msg string) *blockError {
	return &blockError{codes.ServiceUnavailable, reason, msg + ": retry after Max-Age seconds"}
}

// drop forgets the upload k, if any.
func (u *uploads) drop(k uploadKey) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if e := u.m[k]; e != nil {
		u.remove(k, e)
	}
}

// remove forgets e and returns what it held; u.mu is held.
func (u *uploads) remove(k uploadKey, e *upload) {
	delete(u.m, k)
	s := u.bySource[e.source]
	s.uploads--
	s.bytes -= int64(cap(e.body))
	u.total.uploads--
	u.total.bytes -= int64(cap(e.body))
	if s.uploads == 0 {
		delete(u.bySource, e.source)
	}
}

// sweep drops the uploads that have expired; it walks the table at most once
// per quarter timeout unless forced (the table is bounded by MaxUploads).
// u.mu is held.
func (u *uploads) sweep(now time.Time, force bool) {
	if !force && now.Sub(u.lastSweep) < u.cfg.Timeout/4 {
		return
	}
	u.lastSweep = now
	for k, e := range u.m {
		if now.Sub(e.last) >= u.cfg.Timeout {
			u.remove(k, e)
			u.dropped(BlockReasonExpired)
		}
	}
}

// uintBytes encodes a CoAP uint option value: big-endian, no leading zeros.
func uintBytes(v uint32) []byte {
	b := make([]byte, 0, 4)
	for sh := 24; sh >= 0; sh -= 8 {
		if c := byte(v >> sh); c != 0 || len(b) > 0 {
			b = append(b, c)
		}
	}
	return b
}
