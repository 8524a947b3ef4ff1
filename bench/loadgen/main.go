// Open-loop HTTP GET load at a fixed rate, for bench/query_latency.py.
//
//	go run bench/loadgen/main.go -rps 500 -seconds 10 -ids ids.txt -url http://127.0.0.1:6066/users/
//
// Each request is sent on its schedule whether or not earlier ones have
// returned (no coordinated omission); latency runs from the scheduled send to
// the end of the body; API_TOKEN, when set, is sent as the bearer token. 3 s
// of the same load come first, unmeasured (-warm-seconds). Prints one JSON
// object: every latency in µs, and the count per HTTP status. Standard library only, so it builds offline; in Go, the
// load generator costs the 2-core machine ~20% of a core at 500 rps, and its
// collector does not stop it, where the Python one's pauses counted as the
// server's latency.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

func main() {
	rps := flag.Int("rps", 500, "requests per second")
	seconds := flag.Float64("seconds", 10, "duration of the measured run")
	idsPath := flag.String("ids", "", "file with one id per line (the path suffix)")
	url := flag.String("url", "", "URL prefix; an id is appended")
	warm := flag.Float64("warm-seconds", 3, "seconds of the same load, unmeasured, before the run")
	flag.Parse()
	if *idsPath == "" || *url == "" || *rps <= 0 || *seconds <= 0 {
		fmt.Fprintln(os.Stderr, "loadgen: -ids, -url, a positive -rps and -seconds are required")
		os.Exit(2)
	}
	ids, err := readIDs(*idsPath)
	if err != nil || len(ids) == 0 {
		fmt.Fprintf(os.Stderr, "loadgen: no ids from %s: %v\n", *idsPath, err)
		os.Exit(2)
	}
	// the bearer token from the environment, not a flag: argv is visible to every user
	token := os.Getenv("API_TOKEN")
	client := &http.Client{
		Transport: &http.Transport{MaxIdleConns: 512, MaxIdleConnsPerHost: 512, MaxConnsPerHost: 0},
		Timeout:   10 * time.Second,
	}
	get := func(id string) (int, error) {
		req, err := http.NewRequest("GET", *url+id, nil)
		if err != nil {
			return 0, err
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, err
	}
	// Warm up at the measured rate: the server holds the connections this load needs
	// (a run that opens them as it goes measures connection set-up, not reads).
	if _, err := get(ids[0]); err != nil {
		fmt.Fprintf(os.Stderr, "loadgen: first request failed: %v\n", err)
		os.Exit(1)
	}
	run(get, ids, *rps, *warm)
	start := time.Now()
	latencies, statuses := run(get, ids, *rps, *seconds)
	elapsed := time.Since(start).Seconds()
	counts := map[string]int{}
	for _, s := range statuses {
		key := fmt.Sprint(s)
		if s < 0 {
			key = "error"
		}
		counts[key]++
	}
	out := map[string]any{"latencies_us": latencies, "statuses": counts, "elapsed_s": elapsed}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}

// run sends rps requests a second for `seconds` on an open loop; returns each one's
// latency in µs from its scheduled send, and its HTTP status (-1: no answer).
func run(get func(string) (int, error), ids []string, rps int, seconds float64) ([]int64, []int) {
	n := int(float64(rps) * seconds)
	latencies := make([]int64, n)
	statuses := make([]int, n)
	interval := time.Second / time.Duration(rps)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < n; i++ {
		due := start.Add(time.Duration(i) * interval)
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		wg.Add(1)
		go func(i int, due time.Time, id string) {
			defer wg.Done()
			status, err := get(id)
			if err != nil {
				status = -1
			}
			statuses[i] = status
			latencies[i] = time.Since(due).Microseconds()
		}(i, due, ids[rand.Intn(len(ids))])
	}
	wg.Wait()
	return latencies, statuses
}

func readIDs(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ids []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" {
			ids = append(ids, line)
		}
	}
	return ids, sc.Err()
}
