package ingest

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/stretchr/testify/require"
)

// step is one block sent to the table and what must come of it.
type step struct {
	src, uri string
	num      int64
	more     bool
	n        int           // payload bytes (blocks of 16 bytes, szx 0)
	after    time.Duration // since the start
	code     codes.Code    // 0: accepted; Continue for more, Changed for the whole body
	reason   string
}

func TestUploadsBoundPartialBodies(t *testing.T) {
	cfg := BlockwiseConfig{Timeout: 10 * time.Second, MaxUploads: 3, MaxBytes: 90, MaxUploadsPerSource: 2, MaxBytesPerSource: 64}
	tests := []struct {
		name  string
		steps []step
	}{
		{"a body in order is whole after its last block", []step{
			{src: "a", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 1, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 2, n: 5, code: codes.Changed},
		}},
		{"a block after a gap is incomplete", []step{
			{src: "a", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 2, more: true, n: 16, code: codes.RequestEntityIncomplete, reason: BlockReasonIncomplete},
			{src: "a", num: 3, n: 16, code: codes.RequestEntityIncomplete, reason: BlockReasonIncomplete},
		}},
		{"a block of an upload never started is incomplete", []step{
			{src: "a", num: 1, n: 4, code: codes.RequestEntityIncomplete, reason: BlockReasonIncomplete},
		}},
		{"a repeated block rewinds and the body stays right", []step{
			{src: "a", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 1, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 1, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 2, n: 1, code: codes.Changed},
		}},
		{"a short block that is not the last is a bad block", []step{
			{src: "a", num: 0, more: true, n: 15, code: codes.BadRequest, reason: BlockReasonBadBlock},
		}},
		{"a source may hold only max_uploads_per_source uploads", []step{
			{src: "a", uri: "/1", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", uri: "/2", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", uri: "/3", num: 0, more: true, n: 16, code: codes.ServiceUnavailable, reason: BlockReasonSourceLimit},
			{src: "b", uri: "/3", num: 0, more: true, n: 16, code: codes.Continue},
		}},
		{"the server holds only max_uploads uploads", []step{
			{src: "a", uri: "/1", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "b", uri: "/1", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "c", uri: "/1", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "d", uri: "/1", num: 0, more: true, n: 16, code: codes.ServiceUnavailable, reason: BlockReasonTotalLimit},
		}},
		{"a source may hold only max_bytes_per_source bytes", []step{
			{src: "a", uri: "/1", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", uri: "/1", num: 1, more: true, n: 16, code: codes.Continue},
			{src: "a", uri: "/2", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", uri: "/2", num: 1, more: true, n: 16, code: codes.Continue},
			{src: "a", uri: "/2", num: 2, more: true, n: 16, code: codes.ServiceUnavailable, reason: BlockReasonSourceLimit},
			{src: "a", uri: "/2", num: 3, more: true, n: 16, code: codes.RequestEntityIncomplete, reason: BlockReasonIncomplete},
			{src: "a", uri: "/1", num: 2, n: 16, code: codes.Changed},
		}},
		{"the server holds only max_bytes bytes", []step{
			{src: "a", uri: "/1", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", uri: "/1", num: 1, more: true, n: 16, code: codes.Continue},
			{src: "a", uri: "/1", num: 2, more: true, n: 16, code: codes.Continue}, // capacity 64
			{src: "b", uri: "/1", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "b", uri: "/1", num: 1, more: true, n: 16, code: codes.ServiceUnavailable, reason: BlockReasonTotalLimit},
		}},
		{"a body over the largest message is too large", []step{
			{src: "a", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 1, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 2, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 3, more: true, n: 16, code: codes.Continue},
			{src: "a", num: 4, n: 1, code: codes.RequestEntityTooLarge, reason: BlockReasonTooLarge},
		}},
		{"an upload expires and frees its place", []step{
			{src: "a", uri: "/1", num: 0, more: true, n: 16, code: codes.Continue},
			{src: "a", uri: "/2", num: 0, more: true, n: 16, after: time.Second, code: codes.Continue},
			{src: "a", uri: "/3", num: 0, more: true, n: 16, after: 10 * time.Second, code: codes.Continue},
			{src: "a", uri: "/1", num: 1, n: 16, after: 10 * time.Second, code: codes.RequestEntityIncomplete, reason: BlockReasonIncomplete},
			{src: "a", uri: "/2", num: 1, n: 16, after: 10 * time.Second, code: codes.Changed},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var dropped []string
			u := newUploads(cfg, 64, func(r string) { dropped = append(dropped, r) })
			t0 := time.Unix(1_000_000, 0)
			for i, s := range tc.steps {
				k := uploadKey{endpoint: "udp " + s.src + ":5683", uri: s.uri}
				data := bytes.Repeat([]byte{byte('a' + s.num)}, s.n)
				body, err := u.add(k, s.src, block{num: s.num, more: s.more, szx: blockwise.SZX16, data: data}, t0.Add(s.after))
				var be *blockError
				switch {
				case errors.As(err, &be):
					require.Equal(t, s.code, be.code, "step %d: %v", i, err)
					require.Equal(t, s.reason, be.reason, "step %d", i)
				case err != nil:
					t.Fatalf("step %d: %v", i, err)
				case body == nil:
					require.Equal(t, codes.Continue, s.code, "step %d continues", i)
				default:
					require.Equal(t, codes.Changed, s.code, "step %d completes", i)
					want := ""
					for n := range s.num {
						want += string(bytes.Repeat([]byte{byte('a' + n)}, 16))
					}
					want += string(data)
					require.Equal(t, want, string(body), "step %d: the whole body", i)
				}
				n, b := u.held()
				require.LessOrEqual(t, n, cfg.MaxUploads)
				require.LessOrEqual(t, b, cfg.MaxBytes)
			}
			if tc.name == "an upload expires and frees its place" {
				require.Equal(t, []string{BlockReasonExpired}, dropped)
			}
		})
	}
}

// However many sources start uploads and abandon them, the table holds at
// most max_uploads uploads and max_bytes bytes, and holds nothing once they
// have expired.
func TestUploadsNeverHoldMoreThanTheBounds(t *testing.T) {
	cfg := BlockwiseConfig{Timeout: 10 * time.Second, MaxUploads: 50, MaxBytes: 40 << 10, MaxUploadsPerSource: 4, MaxBytesPerSource: 4 << 10}
	u := newUploads(cfg, 256<<10, func(string) {})
	t0 := time.Unix(1_000_000, 0)
	refused := 0
	for i := range 2000 {
		src := fmt.Sprintf("10.0.%d.%d", i/250, i%250%40)
		k := uploadKey{endpoint: "udp " + src + ":1", uri: "/devices/x/readings", tag: fmt.Sprint(i), tagged: true}
		for num := range int64(3) {
			_, err := u.add(k, src, block{num: num, more: true, szx: blockwise.SZX1024, data: make([]byte, 1024)}, t0.Add(time.Duration(i)*time.Millisecond))
			if err != nil {
				refused++
				break
			}
		}
		n, b := u.held()
		require.LessOrEqual(t, n, cfg.MaxUploads)
		require.LessOrEqual(t, b, cfg.MaxBytes)
	}
	require.Positive(t, refused)
	_, err := u.add(uploadKey{endpoint: "late"}, "late", block{more: true, szx: blockwise.SZX16, data: make([]byte, 16)}, t0.Add(time.Minute))
	require.NoError(t, err)
	n, b := u.held()
	require.Equal(t, 1, n, "everything else expired")
	require.Equal(t, int64(16), b)
}

func TestBlockwiseConfigValidate(t *testing.T) {
	ok := DefaultBlockwise()
	require.NoError(t, ok.Validate())
	tests := []struct {
		name   string
		change func(*BlockwiseConfig)
		want   string
	}{
		{"a zero timeout", func(c *BlockwiseConfig) { c.Timeout = 0 }, "ingest.coap.blockwise.timeout"},
		{"a zero bound", func(c *BlockwiseConfig) { c.MaxBytesPerSource = 0 }, "must be > 0"},
		{"more per source than in total", func(c *BlockwiseConfig) { c.MaxUploadsPerSource = c.MaxUploads + 1 }, "max_uploads_per_source"},
		{"more bytes per source than in total", func(c *BlockwiseConfig) { c.MaxBytesPerSource = c.MaxBytes + 1 }, "max_bytes_per_source"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultBlockwise()
			tc.change(&c)
			require.ErrorContains(t, c.Validate(), tc.want)
		})
	}
}
