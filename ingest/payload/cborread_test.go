package payload

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/citypulse/citypulse/sim"
	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/require"
)

// cborEdgeCases are SenML CBOR packs (hex, spaces ignored) where a
// hand-written reader is easily wrong: the reader takes some, fxamacker/cbor
// decides the others.
var cborEdgeCases = []string{
	``, `80`, `9fff`, `f6`, `f7`, `ff`, `a0`, `81`, `81a0`, `81f6`, `81f7`, `8180`, `9f a0`, `9f a1 02 01`,
	`81 a2 00 6170 02 01`, `81 a2 00 6170 02 01 00`, `9f a2 00 6170 02 01 ff`, `9f a2 00 6170 02 01 ff ff`,
	`81 bf 00 6170 02 01 ff`, `81 bf 00 6170 02 ff`, `81 bf 00 6170 02 01`, `81 a2 00 6170 02`,
	`81 a2 00 6170 00 6171`, `81 a3 00 6170 02 01 02 02`, `81 bf 00 6170 02 01 02 02 ff`,
	`81 a2 00 6170 09 01`, `81 a2 00 6170 27 01`, `81 a2 00 6170 6130 01`, `81 a2 00 6170 6176 01`,
	`81 a2 00 6170 f5 01`, `81 a2 00 6170 1bffffffffffffffff 01`, `81 a2 00 6170 3bffffffffffffffff 01`,
	`81 a2 00 6170 41 00 01`, `81 a2 00 6170 09 81818101`, `81 a2 00 6170 09 818181818101`,
	`81 a2 00 6170 02 f6`, `81 a2 00 f6 02 01`, `81 a2 00 6170 02 f7`, `81 a2 00 6170 02 c1 01`,
	`d9d9f7 81 a2 00 6170 02 01`, `81 d9d9f7 a2 00 6170 02 01`, `81 a2 00 6170 02 c2 41 01`,
	`81 a2 00 6170 02 c3 49 010000000000000000`, `81 a2 00 6170 02 c0 6178`, `81 a2 00 c0 6178 02 01`,
	`81 a2 00 6170 02 f97e00`, `81 a2 00 6170 02 f97c01`, `81 a2 00 6170 02 f9fe00`, `81 a2 00 6170 02 f97c00`,
	`81 a2 00 6170 02 f9fc00`, `81 a2 00 6170 02 f98000`, `81 a2 00 6170 02 f90001`, `81 a2 00 6170 02 f98001`,
	`81 a2 00 6170 02 f903ff`, `81 a2 00 6170 02 f90400`, `81 a2 00 6170 02 f97bff`, `81 a2 00 6170 02 f93e00`,
	`81 a2 00 6170 02 fa7fc00001`, `81 a2 00 6170 02 fa7f800001`, `81 a2 00 6170 02 faff800000`,
	`81 a2 00 6170 02 fa00000001`, `81 a2 00 6170 02 fb7ff0000000000001`, `81 a2 00 6170 02 fb8000000000000000`,
	`81 a2 00 6170 02 3bfffffffffffffffe`, `81 a2 00 6170 02 3b7fffffffffffffff`, `81 a2 00 6170 02 3b8000000000000000`,
	`81 a2 00 6170 02 1bffffffffffffffff`, `81 a2 00 6170 02 1b001fffffffffffff`, `81 a2 00 6170 02 1b0020000000000001`,
	`81 a2 00 6170 02 18 01`, `81 a2 18 00 6170 02 19 0001`, `81 a2 00 78 01 70 1a00000002 01`,
	`81 a2 00 6170 02 1c`, `81 a2 00 6170 02 f0`, `81 a2 00 6170 02 f8 20`, `81 a2 00 6170 02 f8 10`,
	`81 a2 00 6170 02 f4`, `81 a2 00 6170 04 f5`, `81 a2 00 6170 04 f4`, `81 a2 00 6170 04 01`, `81 a2 00 6170 04 f6`,
	`81 a3 20 01 00 6170 02 01`, `81 a3 20 0b 00 6170 02 01`, `81 a3 20 20 00 6170 02 01`, `81 a3 20 f93c00 00 6170 02 01`,
	`81 a3 20 1b8000000000000000 00 6170 02 01`, `81 a3 20 3b7fffffffffffffff 00 6170 02 01`,
	`81 a2 00 6170 08 6141`, `81 a2 00 6170 08 4141`, `81 a2 00 6170 03 6141`, `81 a2 00 6170 03 01`, `81 a2 00 01 02 01`,
	`81 a2 00 7f 6170 6171 ff 02 01`, `81 a2 00 7f ff 02 01`, `81 a2 00 7f 61c3 61a9 ff 02 01`, `81 a2 00 7f 62c3a9 ff 02 01`,
	`81 a2 00 7f 4170 ff 02 01`, `81 a2 00 7f 7f ff ff 02 01`, `81 a2 00 7f 6170`, `81 a2 00 5f 4170 ff 02 01`,
	`81 a2 00 61ff 02 01`, `81 a2 00 62c3a9 02 01`, `81 a2 00 63eda080 02 01`, `81 a2 00 6170 02 01 a0`,
	`82 a3 21 72 75726e3a6465763a706970652d303030313a 22 1a69558800 00 6170 a2 00 6170 06 01`,
	`82 a3 21 6a 706970652d303030312f 24 f93c00 00 6170 a1 05 01`, `81 a2 21 6a 706970652d303030322f 00 6170`,
	`81 a3 25 01 00 6170 05 02`, `81 a4 23 626b50 00 6170 01 6150 02 01`, `81 a2 00 6170 07 01`,
	`81 a3 00 6170 02 01 06 fbc1d0000000000000`, `81 a3 00 6170 02 01 06 fb41f0000000000000`,
	`81 a3 22 fb7ff8000000000000 00 6170 02 01`, `81 a3 22 f97c00 00 6170 02 01`,
	`99 1000` + strings.Repeat(`a1 02 01`, 4096), `99 1001` + strings.Repeat(`a1 02 01`, 4097),
	`9f` + strings.Repeat(`a1 02 01`, 4096) + `ff`, `9f` + strings.Repeat(`a1 02 01`, 4097) + `ff`,
	`9f` + strings.Repeat(`a1 02 01`, 4096) + `f6 ff`, `9f a1 02 01 a1 02 f8 00` + strings.Repeat(`a1 02 01`, 4096) + `ff`,
	`81 b8 21` + strings.Repeat(`09 01`, 33), `81 b8 20` + strings.Repeat(`00 6170`, 32), `99 1001 a0`, `9b 0000000000001000 a0`,
	`81 bf` + strings.Repeat(`09 01`, 33) + `ff`, `81 bf 00 6170 02 01 09 ff`, `81 bf 00 6170 02 01 ff ff`,
}

func cborEdgeBytes(t testing.TB, s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	require.NoError(t, err, s)
	return b
}

func TestCBORReaderAgreesWithFxamacker(t *testing.T) {
	for i, s := range cborEdgeCases {
		t.Run(fmt.Sprint(i), func(t *testing.T) { sameAsStd(t, SenMLCBOR, cborEdgeBytes(t, s)) })
	}
	for _, b := range loadtestCBOR(t, 50) {
		sameAsStd(t, SenMLCBOR, b)
	}
}

// The reader itself decodes what devices send (the golden packs, the load
// generator's, RFC 8428 §6 shapes); fxamacker/cbor only sees the rest.
func TestCBORReaderTakesPlainPacks(t *testing.T) {
	packs := loadtestCBOR(t, 20)
	files, err := filepath.Glob(filepath.Join(goldenDir, "*.senml.cbor"))
	require.NoError(t, err)
	require.NotEmpty(t, files)
	for _, p := range files {
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		packs = append(packs, b)
	}
	for _, s := range []string{`9f a2 00 6170 02 01 ff`, `81 bf 00 6170 02 01 ff`, `81 a2 00 7f 6170 6171 ff 02 01`,
		`81 a3 20 01 00 6170 02 f97c00`, `81 a2 00 6170 04 f5`, `81 a2 00 6170 08 6141`} {
		packs = append(packs, cborEdgeBytes(t, s))
	}
	packs = append(packs, benchCBOR10())
	for _, b := range packs {
		_, _, ok := decodeSenMLCBOR(b, "pipe-0001", testNow)
		require.True(t, ok, "%x", b)
	}
}

// loadtestCBOR returns n packs as the load generator sends them
// (sim.Encode): 10 readings, random metric values and times.
func loadtestCBOR(t testing.TB, n int) [][]byte {
	rng := rand.New(rand.NewPCG(7, 7))
	var out [][]byte
	for range n {
		rs := make([]sim.Reading, 10)
		for i := range rs {
			rs[i] = sim.Reading{Name: []string{"pressure", "flow", "leak", "gas_concentration"}[i%4],
				TS: 1767225600000 + rng.Int64N(1e9), V: rng.NormFloat64() * 100}
		}
		rs[2].V = 0
		b, err := sim.Encode("senml-cbor", rs)
		require.NoError(t, err)
		out = append(out, b)
	}
	return out
}

func FuzzSenMLCBORAsStd(f *testing.F) {
	fuzzSeeds(f, ".senml.cbor")
	for _, b := range loadtestCBOR(f, 4) {
		f.Add(b)
	}
	f.Add(benchCBOR10())
	for _, s := range cborEdgeCases {
		if len(s) < 1000 { // the 4096-record ones slow the fuzzer down; the test has them
			f.Add(cborEdgeBytes(f, s))
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) { sameAsStd(t, SenMLCBOR, b) })
}

// benchCBOR10 is a message of the coap.yaml scenario (readings_per_message:
// 10, format: senml-cbor) as cmd/loadtest builds it with sim.Encode.
func benchCBOR10() []byte {
	rs := make([]sim.Reading, 10)
	rng := rand.New(rand.NewPCG(13, 13))
	for i := range rs {
		m := []struct {
			n string
			v float64
		}{{"pressure", 412}, {"flow", 95}, {"leak", 0}, {"gas_concentration", 0.5}}[i%4]
		rs[i] = sim.Reading{Name: m.n, TS: 1796194324271 + int64(i/4)*10000, V: m.v * (1 + 0.01*rng.NormFloat64())}
	}
	b, err := sim.Encode("senml-cbor", rs)
	if err != nil {
		panic(err)
	}
	return b
}

func BenchmarkDecodeCBORReader(b *testing.B) {
	var base []map[int]any
	for i := 0; i < 10; i++ {
		base = append(base, map[int]any{-2: "urn:dev:pipe-0001:", -3: 1767225600, 0: "pressure", 2: 400 + i, 6: i})
	}
	withBase, err := cbor.Marshal(base)
	require.NoError(b, err)
	b.Run("senml-coap-10", func(b *testing.B) { benchBoth(b, SenMLCBOR, benchCBOR10()) })
	b.Run("senml-base-10", func(b *testing.B) { benchBoth(b, SenMLCBOR, withBase) })
}

// packBuilder builds a SenML CBOR pack from fuzz bytes, so that most inputs
// are near the reader's subset: each byte chooses the next shape (definite or
// indefinite array and maps, a key among -8..8, a value of one of the types
// and head sizes SenML CBOR may have).
type packBuilder struct {
	in  []byte
	out []byte
}

func (p *packBuilder) next() byte {
	if len(p.in) == 0 {
		return 0
	}
	c := p.in[0]
	p.in = p.in[1:]
	return c
}

// head appends a head of major type m with argument v, in the smallest size
// or, when the fuzzer asks, a larger one.
func (p *packBuilder) head(m byte, v uint64) {
	size := p.next() % 8
	switch {
	case v < 24 && size < 4:
		p.out = append(p.out, m<<5|byte(v))
	case v < 1<<8 && size < 5:
		p.out = append(p.out, m<<5|24, byte(v))
	case v < 1<<16 && size < 6:
		p.out = append(p.out, m<<5|25, byte(v>>8), byte(v))
	case v < 1<<32 && size < 7:
		p.out = append(p.out, m<<5|26, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	default:
		p.out = append(p.out, m<<5|27)
		p.out = binary.BigEndian.AppendUint64(p.out, v)
	}
}

func (p *packBuilder) uint(n int) uint64 {
	var v uint64
	for range n {
		v = v<<8 | uint64(p.next())
	}
	return v
}

// value appends a value of the kind the fuzzer picks.
func (p *packBuilder) value() {
	texts := []string{"pressure", "urn:dev:pipe-0001:", "pipe-0001/", "kPa", "", "é", "\xff", "a/b", "urn:dev:x:"}
	switch k := p.next() % 12; k {
	case 0, 1:
		s := texts[int(p.next())%len(texts)]
		p.head(3, uint64(len(s)))
		p.out = append(p.out, s...)
	case 2:
		p.out = append(p.out, 0x7f)
		for n := p.next() % 4; n > 0; n-- {
			s := texts[int(p.next())%len(texts)]
			p.head(3, uint64(len(s)))
			p.out = append(p.out, s...)
		}
		p.out = append(p.out, 0xff)
	case 3:
		p.head(0, p.uint(int(p.next()%9)))
	case 4:
		p.head(1, p.uint(int(p.next()%9)))
	case 5:
		p.out = append(p.out, 0xf9, p.next(), p.next())
	case 6:
		p.out = append(p.out, 0xfa, p.next(), p.next(), p.next(), p.next())
	case 7, 8:
		p.out = binary.BigEndian.AppendUint64(append(p.out, 0xfb), math.Float64bits(1767225600+float64(p.uint(4))/1e3))
	case 9:
		p.out = append(p.out, 0xf4+p.next()%4) // false, true, null, undefined
	default:
		p.out = append(p.out, p.next()) // any one byte
	}
}

// pack builds the pack: records of keys -8..8 and values.
func (p *packBuilder) pack() []byte {
	indef := p.next()%4 == 0
	n := uint64(p.next()%6) + 1
	if indef {
		p.out = append(p.out, 0x9f)
	} else {
		p.head(4, n)
	}
	for range n {
		pairs := uint64(p.next() % 5)
		mapIndef := p.next()%4 == 0
		if mapIndef {
			p.out = append(p.out, 0xbf)
		} else {
			p.head(5, pairs)
		}
		for range pairs {
			if k := int(p.next()%17) - 8; k >= 0 {
				p.head(0, uint64(k))
			} else {
				p.head(1, uint64(-1-k))
			}
			p.value()
		}
		if mapIndef {
			p.out = append(p.out, 0xff)
		}
	}
	if indef {
		p.out = append(p.out, 0xff)
	}
	return p.out
}

// FuzzSenMLCBORPacksAsStd is FuzzSenMLCBORAsStd on packs built from the
// input (packBuilder): most are whole SenML packs, many of them in the
// reader's subset, so the fuzzer explores what the reader accepts.
func FuzzSenMLCBORPacksAsStd(f *testing.F) {
	for _, s := range []string{"", "\x01\x02\x03", "\x00\x03\x04\x00\x00\x00\x07\x00\x02\x00\x0c\x00\x06\x07", strings.Repeat("\x05", 64)} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		p := packBuilder{in: in}
		sameAsStd(t, SenMLCBOR, p.pack())
	})
}
