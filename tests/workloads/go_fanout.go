// A Go net/http service for Weft's goroutine tests: `go_fanout ADDR DOWNSTREAM MAXCONNS`.
//
//	GET /fan/<id>   starts two goroutines (`go func(){...}()`), each GETs
//	                http://DOWNSTREAM/leaf/<id>-<i>, waits for both, answers "fan <id>".
//	GET /leaf/<id>  answers "leaf <id>" after LEAF_SLEEP_MS (default 20) ms, so that
//	                concurrent fan-outs overlap.
//
// The client is one http.Transport with MaxConnsPerHost = MAXCONNS (0 = no limit): with 1,
// every call of every handler shares one keep-alive connection, whose writeLoop goroutine was
// started by whichever call dialed first.
//
// `go_fanout spawn N` (for the bench): waits for a line on stdin, then starts N goroutines that
// do nothing, waits for them, and prints the nanoseconds that took.
package main

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

func spawn(n int) {
	bufio.NewReader(os.Stdin).ReadString('\n')
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go wg.Done()
	}
	wg.Wait()
	fmt.Println(time.Since(start).Nanoseconds())
}

func main() {
	if os.Args[1] == "spawn" {
		n, _ := strconv.Atoi(os.Args[2])
		spawn(n)
		return
	}
	addr, downstream := os.Args[1], os.Args[2]
	leafSleep := 20 * time.Millisecond
	if ms, err := strconv.Atoi(os.Getenv("LEAF_SLEEP_MS")); err == nil {
		leafSleep = time.Duration(ms) * time.Millisecond
	}
	maxConns, _ := strconv.Atoi(os.Args[3])
	client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: maxConns, MaxIdleConnsPerHost: 16}}
	http.HandleFunc("/fan/", func(w http.ResponseWriter, r *http.Request) {
		id := strings.TrimPrefix(r.URL.Path, "/fan/")
		var wg sync.WaitGroup
		for i := 0; i < 2; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				resp, err := client.Get(fmt.Sprintf("http://%s/leaf/%s-%d", downstream, id, i))
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}(i)
		}
		wg.Wait()
		body := "fan " + id
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write([]byte(body))
	})
	http.HandleFunc("/leaf/", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(leafSleep)
		body := "leaf " + strings.TrimPrefix(r.URL.Path, "/leaf/")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write([]byte(body))
	})
	if err := http.ListenAndServe(addr, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
