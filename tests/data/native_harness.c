/* Drives preimage's C kernels (src/preimage/native.c) over odd shapes and 1-5 threads, for a
 * build with AddressSanitizer and UndefinedBehaviorSanitizer (tests/test_native.py): any read or
 * write outside the buffers, or undefined arithmetic, aborts the run. */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
int preimage_update(float *x, const float *grad, float *G, float *mu, int64_t N, int64_t C, int64_t H,
                     int64_t W, double alpha, double B, double B_plus, double V, double lambda_alpha,
                     double lambda_tv, double rho, float lr, float *e_range, float *e_tv, int threads);
int preimage_l2_bf16(const uint16_t*, const uint16_t*, const float*, uint16_t*, float*, int64_t, int64_t, int);
int preimage_l2_f32(const float*, const float*, const float*, float*, float*, int64_t, int64_t, int);
int preimage_crop(const float*, const int64_t*, const float*, void*, int64_t, int64_t, int64_t, int64_t, int64_t,
                  int64_t, int, int, int);
int preimage_uncrop(const void*, const int64_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t, int64_t, int64_t, int64_t, int, int);
int preimage_dsift_normalize(const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t, float, float, float, int);
int preimage_dsift_normalize_backward(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                                      float*, int64_t, int64_t, int64_t, int64_t, int64_t, float, float, float, int);
int preimage_maxpool(const void*, void*, uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                     int64_t, int64_t, int64_t, int64_t, int, int, int, int);
int preimage_maxpool_backward(const void*, const uint8_t*, void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int);
int preimage_hog_pool(const int32_t*, const float*, const int32_t*, const float*, const int32_t*, const int32_t*,
                      const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
int preimage_hog_pool_backward(const float*, const int32_t*, const int32_t*, const int32_t*, const int32_t*,
                               const float*, float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
int preimage_dsift_maps(const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        const float*, int);
int preimage_dsift_maps_backward(const float*, const float*, float*, float*, int64_t, int64_t, int64_t, int64_t,
                                 int64_t, int64_t, int64_t, const float*, int);
int preimage_dsift_pool(const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        int64_t, int64_t, int64_t, const float*, const float*, const float*, int);
int preimage_dsift_pool_backward(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                 int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                                 const float*, int);
int preimage_hog_orientations(const float*, const float*, const float*, const float*, int64_t, int64_t, int32_t*,
                              float*, int32_t*, float*, float*, int);
int preimage_hog_differences(const float*, int64_t, int64_t, int64_t, int64_t, float*, float*, float*, int32_t*, int);
int preimage_hog_differences_backward(const float*, const float*, const float*, const float*, float, const float*,
                                      const float*, const float*, float, const int32_t*, float*, int64_t, int64_t,
                                      int64_t, int64_t, int);
int preimage_hog_normalize(const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t, float, int);
int preimage_hog_normalize_backward(const float*, int64_t, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                                    float, int);
#include <math.h>
static float rnd(void){ return (float)rand()/RAND_MAX*2-1; }
int main(void){
  int64_t shapes[][4]={{1,3,1,1},{1,3,1,9},{3,1,8,1},{2,3,17,21},{5,3,4,6},{1,3,40,33},{7,1,3,2}};
  for (int s=0;s<7;s++) for (int th=1; th<=5; th++) {
    int64_t N=shapes[s][0],C=shapes[s][1],H=shapes[s][2],W=shapes[s][3], n=N*C*H*W;
    float *x=malloc(n*4),*g=malloc(n*4),*G=malloc(n*4),*mu=malloc(n*4),*er=malloc(N*4),*et=malloc(N*4);
    for(int64_t i=0;i<n;i++){x[i]=rnd()*100;g[i]=rnd();G[i]=0;mu[i]=0;}
    for (int it=0; it<3; it++) if (preimage_update(x,g,G,mu,N,C,H,W,6,80,160,80/6.5,1,1,0.9,5.0f,er,et,th)) return 1;
    for (int it=0; it<2; it++) if (preimage_update(x,g,G,mu,N,C,H,W,4,80,160,80/6.5,1,1,0.9,5.0f,er,et,th)) return 1;
    uint16_t *a=malloc(n*2),*b=malloc(n*2),*o=malloc(n*2); float *sc=malloc(N*4),*v=malloc(N*4);
    for(int64_t i=0;i<n;i++){a[i]=(uint16_t)(rand()&0x3fff);b[i]=(uint16_t)(rand()&0x3fff);} for(int i=0;i<N;i++) sc[i]=1;
    if (preimage_l2_bf16(a,b,sc,o,v,N,C*H*W,th)) return 1;
    float *fo=malloc(n*4); if (preimage_l2_f32(x,g,sc,fo,v,N,C*H*W,th)) return 1;
    /* the jitter crop (T = 3) and its gradient: every dtype, layout, divisor and stride case */
    int64_t Hc=H+2, Wc=W+2, cn=N*C*Hc*Wc, *off=malloc(N*2*8); float *cv=malloc(cn*4), *dv=malloc(C*4), *back=malloc(cn*4);
    for(int64_t i=0;i<cn;i++) cv[i]=rnd()*100; for(int c=0;c<C;c++) dv[c]=0.5f+c;
    for(int i=0;i<N;i++){off[2*i]=rand()%3; off[2*i+1]=rand()%3;}
    for (int k=0;k<8;k++) {
      int bf=k&1, nhwc=(k>>1)&1; const float *d=(k>>2)?dv:NULL;
      void *cr=malloc(n*(bf?2:4)); /* exactly the crop: a write past it is caught */
      if (preimage_crop(cv,off,d,cr,N,C,Hc,Wc,H,W,bf,nhwc,th)) return 1;
      int64_t sn=C*H*W, sc_=nhwc?1:H*W, sh=nhwc?W*C:W, sw=nhwc?C:1;
      if (preimage_uncrop(cr,off,d,back,N,C,Hc,Wc,H,W,sn,sc_,sh,sw,bf,th)) return 1;
      free(cr);
    }
    free(off);free(cv);free(dv);free(back);
    free(x);free(g);free(G);free(mu);free(er);free(et);free(a);free(b);free(o);free(sc);free(v);free(fo);
  }
  /* DSIFT's normalization: (N, 128, F) histograms, contiguous and transposed, F = 1..7 frames */
  for (int64_t F=1; F<=7; F+=3) for (int th=1; th<=5; th+=2) for (int tr=0; tr<2; tr++) {
    int64_t N=2, m=N*128*F; float *h=malloc(m*4), *o=malloc(m*4), *g=malloc(m*4), *gh=malloc(m*4);
    for (int64_t i=0;i<m;i++){h[i]=rnd()>0?rnd()*9:0; g[i]=rnd();}
    int64_t sn=128*F, sd=tr?1:F, sf=tr?128:1;
    if (preimage_dsift_normalize(h,sn,sd,sf,o,N,F,1.2e-7f,0.2f,1e-8f,th)) return 1;
    if (preimage_dsift_normalize_backward(h,sn,sd,sf,g,F*128,128,1,gh,128*F,F,1,N,F,1.2e-7f,0.2f,1e-8f,th)) return 1;
    free(h);free(o);free(g);free(gh);
  }
  /* max pooling and its gradient: (kernel, stride, pad, ceil) geometries, C across the 16-lane
   * blocks, both dtypes and layouts, with and without the ReLU, buffers of exactly their size */
  int64_t geo[][7]={{3,3,2,2,0,0,1},{3,3,2,2,1,1,0},{2,2,2,2,0,0,0},{5,3,1,2,2,1,1},{1,1,3,3,0,0,0}};
  int64_t pshapes[][4]={{1,1,1,1},{2,5,13,11},{1,17,7,8},{3,40,9,10}};
  for (int q=0;q<5;q++) for (int s=0;s<4;s++) for (int k=0;k<8;k++) for (int th=1; th<=3; th+=2) {
    int64_t kh=geo[q][0],kw=geo[q][1],sh=geo[q][2],sw=geo[q][3],ph=geo[q][4],pw=geo[q][5],ceil=geo[q][6];
    int64_t N=pshapes[s][0],C=pshapes[s][1],H=pshapes[s][2],W=pshapes[s][3];
    if (H+2*ph<kh || W+2*pw<kw) continue;
    int64_t OH=(H+2*ph-kh+(ceil?sh-1:0))/sh+1, OW=(W+2*pw-kw+(ceil?sw-1:0))/sw+1;
    if (ceil && (OH-1)*sh>=H+ph) OH--;
    if (ceil && (OW-1)*sw>=W+pw) OW--;
    int bf=k&1, nhwc=(k>>1)&1, relu=k>>2; size_t es=bf?2:4; int64_t n=N*C*H*W, m=N*C*OH*OW;
    void *x=malloc(n*es), *y=malloc(m*es), *gy=malloc(m*es), *gx=malloc(n*es); uint8_t *id=malloc(m);
    for (int64_t i=0;i<n;i++){ float v=rnd()*4; if (bf) ((uint16_t*)x)[i]=(uint16_t)(*(uint32_t*)&v>>16); else ((float*)x)[i]=v; }
    for (int64_t i=0;i<m;i++){ float v=rnd(); if (bf) ((uint16_t*)gy)[i]=(uint16_t)(*(uint32_t*)&v>>16); else ((float*)gy)[i]=v; }
    if (preimage_maxpool(x,y,id,N,C,H,W,OH,OW,kh,kw,sh,sw,ph,pw,bf,nhwc,relu,th)) return 1;
    if (preimage_maxpool(x,y,NULL,N,C,H,W,OH,OW,kh,kw,sh,sw,ph,pw,bf,nhwc,relu,th)) return 1;
    if (preimage_maxpool_backward(gy,id,gx,N,C,H,W,OH,OW,kh,kw,sh,sw,ph,pw,bf,nhwc,th)) return 1;
    free(x);free(y);free(gy);free(gx);free(id);
  }
  /* HOG's pooling and its transpose: VLFeat's cell geometry (images of 3 pixels and up, cell
   * sizes from 1), one and two terms, slots at both ends, buffers of exactly their size */
  int64_t hshapes[][3]={{3,3,1},{3,9,4},{13,5,4},{20,31,8},{17,17,6},{9,40,3}};
  for (int q=0;q<6;q++) for (int T=1;T<=2;T++) for (int th=1; th<=5; th+=2) {
    int64_t H=hshapes[q][0], W=hshapes[q][1], cs=hshapes[q][2], N=2, S=7, Hi=H-2, Wi=W-2, st=T*S;
    int64_t Hc=(H+cs/2)/cs, Wc=(W+cs/2)/cs, P=N*Hi*Wi;
    int32_t *top=malloc(Hi*4), *left=malloc(Wi*4), *s0=malloc(P*4), *s1=malloc(P*4);
    for (int64_t i=0;i<Hi;i++) top[i]=(int32_t)floorf((float)((i+1.5)/cs-0.5));
    for (int64_t i=0;i<Wi;i++) left[i]=(int32_t)floorf((float)((i+1.5)/cs-0.5));
    float *corner=malloc(4*Hi*Wi*4), *v0=malloc(P*4), *v1=malloc(P*4), *cells=malloc(N*Hc*Wc*st*4);
    float *padded=malloc(N*(Hc+2)*(Wc+2)*st*4), *g0=malloc(P*4), *g1=malloc(P*4);
    for (int64_t i=0;i<4*Hi*Wi;i++) corner[i]=rnd();
    for (int64_t i=0;i<P;i++){ s0[i]=rand()%S; s1[i]=(int32_t)(i%2?S-1:0); v0[i]=rnd(); v1[i]=rnd(); }
    for (int64_t i=0;i<N*(Hc+2)*(Wc+2)*st;i++) padded[i]=rnd();
    if (preimage_hog_pool(s0,v0,T>1?s1:NULL,T>1?v1:NULL,top,left,corner,cells,N,Hi,Wi,Hc,Wc,S,th)) return 1;
    if (preimage_hog_pool_backward(padded,s0,T>1?s1:NULL,top,left,corner,g0,T>1?g1:NULL,N,Hi,Wi,Hc,Wc,S,th)) return 1;
    free(top);free(left);free(s0);free(s1);free(corner);free(v0);free(v1);free(cells);free(padded);free(g0);free(g1);
  }
  /* HOG's central differences and the end of its backward pass: images of 3 pixels and up, gray
   * and colour (ties between channels), HOG and HOGb (across a tensor or a scalar), buffers of
   * exactly their size */
  int64_t fshapes[][2]={{3,3},{3,9},{7,4},{12,17}};
  for (int q=0;q<4;q++) for (int64_t C=1; C<=3; C+=2) for (int T=1;T<=3;T++) for (int th=1; th<=5; th+=2) {
    int64_t H=fshapes[q][0], W=fshapes[q][1], N=2, P=N*(H-2)*(W-2);
    float *img=malloc(N*C*H*W*4), *out=malloc(N*C*H*W*4), *gx=malloc(P*4), *gy=malloc(P*4), *g2=malloc(P*4);
    float *mag=malloc(P*4), *g0=malloc(P*4), *g1=malloc(P*4), *al=malloc(P*4), *ac=malloc(P*4);
    int32_t *ch=malloc(P*4);
    for (int64_t i=0;i<N*C*H*W;i++) img[i]=(float)(rand()%5);
    for (int64_t i=0;i<P;i++){ g0[i]=rnd(); g1[i]=rnd(); al[i]=rnd(); ac[i]=rnd(); }
    if (preimage_hog_differences(img,N,C,H,W,gx,gy,g2,C>1?ch:NULL,th)) return 1;
    for (int64_t i=0;i<P;i++) mag[i]=sqrtf(g2[i]);
    for (int64_t i=0;i<P && C>1;i++) if (ch[i]<0 || ch[i]>=C) { puts("channel out of range"); return 1; }
    if (preimage_hog_differences_backward(g0,T>1?g1:NULL,T>1?al:NULL,T==3?ac:NULL,0.7f,gx,gy,mag,1.1754944e-38f,
                                          C>1?ch:NULL,out,N,C,H,W,th)) return 1;
    free(img);free(out);free(gx);free(gy);free(g2);free(mag);free(g0);free(g1);free(al);free(ac);free(ch);
  }
  /* HOG's orientation scan: 1 to 200 pixels (partial blocks of lanes), K = 1 .. 9, HOG and HOGb,
   * null gradients, buffers of exactly their size */
  for (int64_t M=1; M<=200; M+=37) for (int64_t K=1; K<=9; K+=4) for (int bil=0; bil<=(K>1); bil++) for (int th=1; th<=5; th+=2) {
    float *gx=malloc(M*4), *gy=malloc(M*4), *g2=malloc(M*4), *table=malloc(K*2*4), *mag=malloc(M*4), *term=malloc(M*4), *along=malloc(M*4);
    int32_t *slot=malloc(M*4), *lower=malloc(M*4);
    for (int64_t i=0;i<M;i++){ gx[i]=(i%7==0)?0.0f:rnd()*100; gy[i]=(i%7==0)?0.0f:rnd()*100; g2[i]=gx[i]*gx[i]+gy[i]*gy[i]; }
    for (int64_t k=0;k<K;k++){ table[2*k]=cosf((float)k*3.14159265f/K); table[2*k+1]=sinf((float)k*3.14159265f/K); }
    if (preimage_hog_orientations(gx,gy,g2,table,M,K,slot,mag,bil?lower:NULL,bil?term:NULL,bil?along:NULL,th)) return 1;
    for (int64_t i=0;i<M;i++) if (slot[i]<1 || slot[i]>2*K || (bil && (lower[i]<0 || lower[i]>2*K))) { puts("slot out of range"); return 1; }
    free(gx);free(gy);free(g2);free(table);free(mag);free(term);free(along);free(slot);free(lower);
  }
  /* HOG's block normalization and its transpose: one cell and up, K = 1 .. 9, images spaced
   * apart in a larger buffer (hist_stride), buffers of exactly their size */
  for (int64_t Hc=1; Hc<=4; Hc+=3) for (int64_t Wc=1; Wc<=5; Wc+=2) for (int64_t K=1; K<=9; K+=4) for (int th=1; th<=5; th+=2) {
    int64_t N=3, HW=Hc*Wc, st=3*2*K*HW, C=3*K+4;
    float *hist=malloc(N*st*4), *code=malloc(N*C*HW*4), *grad=malloc(N*C*HW*4), *gh=malloc(N*2*K*HW*4);
    for (int64_t i=0;i<N*st;i++) hist[i]=fabsf(rnd())*(i%3?1.0f:0.0f);
    for (int64_t i=0;i<N*C*HW;i++) grad[i]=rnd();
    if (preimage_hog_normalize(hist+2*K*HW,st,code,N,K,Hc,Wc,0.2357f,th)) return 1;
    if (preimage_hog_normalize_backward(hist+2*K*HW,st,grad,gh,N,K,Hc,Wc,0.2357f,th)) return 1;
    free(hist);free(code);free(grad);free(gh);
  }
  /* DSIFT's orientation maps and their transpose: maps wider than the image (padding), inside it
   * (bounds), 2 x 2 images, flat and constant regions (zero gradients), buffers of exactly their size */
  int64_t dshapes[][7]={{2,2,1,-3,8,-3,8},{5,9,3,-2,9,1,6},{17,6,2,3,10,-1,8},{8,8,1,0,8,0,8},{12,7,4,-4,20,2,3}};
  const float dk[7]={1.19209290e-07f,0.1821f,0.9675f,0.78539819f,1.5707964f,6.2831855f,1.0000001e-8f};
  for (int q=0;q<5;q++) for (int th=1; th<=5; th+=2) {
    int64_t H=dshapes[q][0], W=dshapes[q][1], N=dshapes[q][2], fr=dshapes[q][3], R=dshapes[q][4], fc=dshapes[q][5], Cm=dshapes[q][6];
    float *pix=malloc(H*W*N*4), *maps=malloc(R*Cm*N*8*4), *G=malloc(R*Cm*N*8*4), *dx=malloc(H*W*N*4), *dy=malloc(H*W*N*4);
    for (int64_t i=0;i<H*W*N;i++) pix[i]=(i%5==0)?7.0f:rnd()*255;
    for (int64_t i=0;i<R*Cm*N*8;i++) G[i]=rnd();
    if (preimage_dsift_maps(pix,maps,N,H,W,fr,R,fc,Cm,dk,th)) return 1;
    if (preimage_dsift_maps_backward(pix,G,dx,dy,N,H,W,fr,R,fc,Cm,dk,th)) return 1;
    free(pix);free(maps);free(G);free(dx);free(dy);
  }
  /* DSIFT's fused maps and banded binning and their transpose: one-pixel bins, steps of one and
   * two bins, frames inside the image (bounds), uneven chunks of images (9, 17), more threads than
   * centres, buffers of exactly their size */
  int64_t bshapes[][7]={{4,4,1,1,1,0,0},{9,13,3,2,2,0,0},{20,17,9,3,6,0,0},{16,16,17,4,4,0,0},{30,25,5,4,8,3,2},{4,6,2,1,1,0,1}};
  for (int q=0;q<6;q++) for (int th=1; th<=9; th+=4) {
    int64_t H=bshapes[q][0], W=bshapes[q][1], N=bshapes[q][2], s=bshapes[q][3], step=bshapes[q][4], ymin=bshapes[q][5], xmin=bshapes[q][6];
    int64_t ratio=step/s, nfy=(H-1-ymin-3*s)/step+1, nfx=(W-1-xmin-3*s)/step+1;
    if (H-1-ymin-3*s<0 || W-1-xmin-3*s<0) { puts("bad pool shape"); return 1; }
    int64_t Jr=(nfy-1)*ratio+4, Jc=(nfx-1)*ratio+4, F=nfy*nfx;
    float *pix=malloc(H*W*N*4), *hist=malloc(F*N*128*4), *gh=malloc(F*N*128*4), *gi=malloc(H*W*N*4);
    float *kr=malloc(4*2*s*4), *kc=malloc(4*2*s*4);
    for (int64_t i=0;i<H*W*N;i++) pix[i]=(i%5==0)?7.0f:rnd()*255;
    for (int64_t i=0;i<F*N*128;i++) gh[i]=rnd();
    for (int64_t i=0;i<8*s;i++){kr[i]=rnd(); kc[i]=rnd();}
    if (preimage_dsift_pool(pix,hist,N,H,W,ymin-s+1,Jr,xmin-s+1,Jc,s,ratio,nfy,nfx,kr,kc,dk,th)) return 1;
    if (preimage_dsift_pool_backward(pix,gh,gi,N,H,W,ymin-s+1,Jr,xmin-s+1,Jc,s,ratio,nfy,nfx,kr,kc,dk,th)) return 1;
    free(pix);free(hist);free(gh);free(gi);free(kr);free(kc);
  }
  puts("ok"); return 0;
}
